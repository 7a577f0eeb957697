"""``EditDataModule``: edit / equivalent / locality examples for training learned editors.

Reads any file :func:`kedit.data.load_requests` reads (the MEND-schema files
``counterfact_train_mend.json`` and ``zsre_train_mend.json`` included). Each example is
one edit request flattened to strings::

    {"prompt": edit prompt, "target": new answer, "equiv": a paraphrase of the prompt,
     "loc_prompt": an unrelated prompt, "loc_answer": its answer,
     "nb_prompts": same-relation neighbours, "nb_answers": their answers, "index": record index}

``loc_prompt`` is the record's first locality probe (CounterFact's is a prompt of the same
relation whose answer is the edit's old answer), else another record's prompt. ``nb_prompts``
(``neighbours`` per training edit, MEND's loss keeps them too; empty by default) are the
prompts of other records with the same template (the prompt with its subject cut out, i.e. the
same relation) with their true answers, taken in file order after the record.

A batch is a dict of lists (tokenization is the module's job: it owns the tokenizer).

The training order is a seeded :class:`DistributedSampler` in every case: one process reads
the permutation with one replica, R processes under DDP each read their shard of the same
permutation, so R processes with batch B see the same examples per step as one process with
batch R*B. The permutation is reshuffled each epoch (``set_epoch``) and its seed (``seed_everything``)
is stored in the checkpoint, so a resumed run, in any epoch, reads the batches of its epoch in the
same order and skips exactly those it has already trained on.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kedit.lightning.common import DataError, DataFileError

log = logging.getLogger(__name__)


class EditExamples(Dataset):
    """Edit requests as flat string examples (see module docstring)."""

    def __init__(self, requests: list, source: str = "", neighbours: int = 0) -> None:
        if not requests:
            raise DataError(f"no edit requests in {source or 'the given records'}")
        if neighbours < 0:
            raise DataError(f"neighbours must be >= 0, got {neighbours}")
        self.requests = requests
        self.source = source
        self.neighbours = neighbours
        self.same: dict[str, list[int]] = {}  # template -> indices of records with a true answer
        if neighbours:
            for i, r in enumerate(requests):
                if r.target_true and r.subject and r.subject in r.prompt:
                    self.same.setdefault(template(r), []).append(i)

    def same_relation(self, i: int) -> list[int]:
        """Up to ``neighbours`` other records of record ``i``'s template, the next ones in file order."""
        if not self.neighbours:
            return []
        r = self.requests[i]
        group = self.same.get(template(r), []) if r.subject and r.subject in r.prompt else []
        if i in group:
            at = group.index(i)
            group = group[at + 1:] + group[:at]
        return [j for j in group if self.requests[j].subject != r.subject][: self.neighbours]

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.requests[i]
        equiv = r.paraphrase_prompts[0] if r.paraphrase_prompts else r.prompt
        if r.neighborhood:
            loc_prompt, loc_answer = r.neighborhood[0].prompt, r.neighborhood[0].answer
        else:  # no locality probe: another record's fact must stay as it was
            other = self.requests[(i + 1) % len(self.requests)]
            loc_prompt, loc_answer = other.prompt, other.target_true or other.target_new
        near = [self.requests[j] for j in self.same_relation(i)]
        return {"prompt": r.prompt, "target": r.target_new, "equiv": equiv,
                "loc_prompt": loc_prompt, "loc_answer": loc_answer,
                "nb_prompts": [n.prompt for n in near], "nb_answers": [n.target_true for n in near], "index": i}


def template(request) -> str:
    """The request's prompt with its subject cut out: records of one relation share it."""
    return request.prompt.replace(request.subject, "{}", 1)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {k: [it[k] for it in items] for k in items[0] if k != "index"}
    batch["index"] = torch.tensor([it["index"] for it in items])
    return batch


class SkippingDataLoader(DataLoader):
    """A DataLoader whose next iteration starts ``skip_batches`` batches in (resume mid-epoch).

    Iteration is lazy: nothing is read from the sampler until the first batch is asked for.
    Lightning creates the epoch's iterator before it calls ``set_epoch`` on the sampler, so an
    eager skip would draw the resumed epoch's batches from epoch 0's permutation.
    """

    def __init__(self, *args: Any, skip_batches: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_batches = skip_batches

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        return self._batches(skip)

    def _batches(self, skip: int):
        it = super().__iter__()
        for _ in range(skip):
            next(it, None)
        yield from it

    # Lightning saves/restores "stateful" loaders; the position comes from its batch progress
    # (EditDataModule._resume_skip), the seed from EditDataModule.state_dict.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EditDataModule(LightningDataModule):
    """Edit / equivalent / locality batches from a file of edit requests."""

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        val_size: int = 200,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        format: str = "auto",
        on_error: str = "skip",
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        neighbours: int = 0,
    ) -> None:
        """
        Args:
            train_path: Training edits: a MEND-schema JSON (e.g. counterfact_train_mend.json) or any
                file kedit.data.load_requests reads.
            val_path: Validation edits; if not given, ``val_size`` records are held out of train_path.
            val_size: Records held out of train_path for validation when val_path is not given.
            batch_size: Edits per step and per process (DDP: the global batch is this times the world size).
            val_batch_size: Edits per validation step (default: batch_size).
            limit_train: Use only the first N training records (after the split).
            limit_val: Use only the first N validation records.
            format: Record format for load_requests ("auto" detects it).
            on_error: Bad records: "skip" drops them (logged), "raise" stops at the first one.
            seed: Seed of the train/val split (the batch order follows seed_everything).
            shuffle: Shuffle each epoch (seeded by seed_everything); false keeps file order (under DDP:
                each process reads every R-th record).
            num_workers: DataLoader worker processes.
            neighbours: Same-relation neighbours per training edit (other records of the same
                template, with their true answers) whose predictions MEND's locality loss keeps,
                beside the record's own locality prompt; 0: none. Validation keeps one locality prompt.
                MALMEN and SERAC ignore them (and log a warning when fitting).
        """
        super().__init__()
        # str, not Path: checkpoints hold the hyperparameters and are read with weights_only=True
        train_path, val_path = str(train_path), None if val_path is None else str(val_path)
        self.save_hyperparameters()
        self.train_path, self.val_path, self.val_size = train_path, val_path, val_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.limit_train, self.limit_val, self.format = limit_train, limit_val, format
        self.on_error = on_error
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.neighbours = neighbours
        self.train_set: EditExamples | None = None
        self.val_set: EditExamples | None = None
        self.shuffle_seed: int | None = None  # fixed by the first train_dataloader or by a checkpoint
        self.check_files(train_path, val_path)

    @staticmethod
    def check_files(train_path: str | None, val_path: str | None = None) -> None:
        """Fail before anything is trained or logged when a data file does not exist. A dataset
        name (``counterfact:train``, ``counterfact-sample``: :mod:`kedit.data.named`) is resolved
        to its file here, which downloads it once when it comes from the hub.

        ``python -m kedit.train`` calls it on the parsed config, before the loggers are built.
        """
        from kedit.data import named
        from kedit.paths import DataNotFound

        for key, path in (("train_path", train_path), ("val_path", val_path)):
            if path is None:
                continue
            if named.is_named(str(path)):
                try:
                    named.resolve(str(path))
                except (DataNotFound, ValueError) as err:
                    raise DataFileError(f"data.init_args.{key}: {err}") from None
            elif not Path(path).is_file():
                raise DataFileError(f"data.init_args.{key}: no such file: {path}")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from kedit.data.loaders import load_requests

        train = load_requests(self.train_path, format=self.format, on_error=self.on_error)
        if self.val_path is not None:
            val = load_requests(self.val_path, format=self.format, on_error=self.on_error)
        else:
            if self.val_size >= len(train):
                raise DataError(f"{self.train_path}: val_size={self.val_size} leaves no training records "
                                 f"(file has {len(train)})")
            held = set(random.Random(self.seed).sample(range(len(train)), self.val_size))
            val = [train[i] for i in sorted(held)]
            train = [r for i, r in enumerate(train) if i not in held]
        if self.limit_train:
            train = train[: self.limit_train]
        if self.limit_val:
            val = val[: self.limit_val]
        self.train_set = EditExamples(train, self.train_path, neighbours=self.neighbours)
        self.val_set = EditExamples(val, self.val_path or f"{self.train_path} (held out)")
        log.info("EditDataModule: %d training and %d validation edits", len(train), len(val))

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the seed of the training order."""
        return {} if self.shuffle_seed is None else {"shuffle_seed": self.shuffle_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "shuffle_seed" in state:
            self.shuffle_seed = int(state["shuffle_seed"])

    def _resume_skip(self, batches: int) -> int:
        """Batches of the current epoch a resumed run has already trained on."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done if 0 < done < batches else 0

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        # the sampler Lightning would inject under DDP, built here so that its seed and epoch are ours
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {"num_replicas": 1, "rank": 0}
        if self.shuffle_seed is None:
            self.shuffle_seed = int(os.getenv("PL_GLOBAL_SEED", 0))
        sampler = DistributedSampler(self.train_set, shuffle=self.shuffle, seed=self.shuffle_seed,
                                     num_replicas=shard["num_replicas"], rank=shard["rank"])
        if trainer is not None:  # Lightning sets it again at each epoch start
            sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        skip = self._resume_skip(-(-len(sampler) // self.batch_size))
        if skip:
            log.info("resuming epoch %d: skipping %d batches already trained on", sampler.epoch, skip)
        return SkippingDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                                  collate_fn=collate, num_workers=self.num_workers, skip_batches=skip)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers)


def check_data_config(data: Any) -> None:
    """The data files of a parsed ``data`` config (class_path + init_args) exist, if it is an EditDataModule."""
    import importlib

    if not data or not isinstance(data.get("class_path"), str):
        return
    module, _, name = data["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return  # LightningCLI reports it
    if isinstance(cls, type) and issubclass(cls, EditDataModule):
        args = data.get("init_args") or {}
        EditDataModule.check_files(args.get("train_path"), args.get("val_path"))

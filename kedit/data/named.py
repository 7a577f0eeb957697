"""Public editing datasets by name: ``load_requests("counterfact", split="dev")``.

A name resolves, in this order, to

1. the packaged sample (``counterfact-sample``: 48 CounterFact records inside the package);
2. the file of that split under ``$KEDIT_DATA`` (the layout of the development data:
   ``counterfact/counterfact_dev_rome.json``, ...), when ``KEDIT_DATA`` is set;
3. a copy downloaded earlier from the Hugging Face hub, in ``$KEDIT_CACHE/datasets``;
4. the Hugging Face hub, through ``datasets``, at the id and revision pinned in :data:`DATASETS`.
   The records are written to the cache as JSON, so later loads work offline.

When none of these works the error is one line that says how to pass a local file. The hub is
asked once, with a short timeout: there is no retry storm when the machine is offline.

A name may carry its split after a colon (``"zsre:train"``), which is how the CLI
(``--data counterfact:dev``) and the training configs (``train_path: counterfact:train``) name them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from kedit import paths
from kedit.atomic import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hub:
    """Where a split lives on the Hugging Face hub."""

    repo: str
    revision: str
    split: str = "train"
    data_files: str | None = None


@dataclass(frozen=True)
class NamedDataset:
    """One public dataset: its splits as files of the development-data layout, and on the hub."""

    description: str
    files: dict[str, str]
    """split -> path relative to ``$KEDIT_DATA``."""
    hub: dict[str, Hub] = field(default_factory=dict)
    """split -> its copy on the hub (splits without one are local only)."""
    default_split: str = "dev"


SAMPLE = "counterfact-sample"

DATASETS: dict[str, NamedDataset] = {
    SAMPLE: NamedDataset(
        "48 CounterFact records (ROME schema) shipped inside the package", files={}, default_split="sample"),
    "counterfact": NamedDataset(
        "CounterFact (Meng et al. 2022), ROME schema for dev, MEND/EasyEdit schema for train",
        files={"dev": "counterfact/counterfact_dev_rome.json",
               "dev-mend": "counterfact/counterfact_dev_mend.json",
               "train": "counterfact/counterfact_train_mend.json"},
        # the whole of ROME's counterfact.json (21,919 records) in one split
        hub={"all": Hub("azhx/counterfact", revision="main", split="train")}),
    "zsre": NamedDataset(
        "zsRE question answering edits, MEND schema",
        files={"dev": "zsre/zsre_dev_mend.json", "train": "zsre/zsre_train_mend.json"}),
    "knowedit-zsre": NamedDataset(
        "KnowEdit's ZsRE test set (Zhang et al. 2024)",
        files={"dev": "zsre/zsre_dev_knowedit.json"},
        hub={"dev": Hub("zjunlp/KnowEdit", revision="main", data_files="benchmark/ZsRE/ZsRE-test-all.json")}),
    "knowedit-wiki-counterfact": NamedDataset(
        "KnowEdit's WikiData_counterfact", files={"train": "knowedit/wiki_counterfact_train_cf.json"},
        default_split="train"),
    "mquake": NamedDataset(
        "MQuAKE-CF (Zhong et al. 2023), multi-hop questions after edits",
        files={"hard": "mquake/MQuAKE-hard.json"}, default_split="hard"),
}


class DatasetUnavailable(paths.DataNotFound):
    """A named dataset is neither local nor reachable on the hub."""


def parse(source: str, split: str | None = None) -> tuple[str, str] | None:
    """``("counterfact", "dev")`` for ``"counterfact"`` / ``"counterfact:dev"``; None if not a registered name."""
    name, _, named_split = source.partition(":")
    key = name.strip().lower()
    if key not in DATASETS:
        return None
    dataset = DATASETS[key]
    chosen = split or named_split or dataset.default_split
    if split and named_split and split != named_split:
        raise ValueError(f"dataset {source!r} names split {named_split!r}, and split={split!r} was also given")
    splits = sorted({*dataset.files, *dataset.hub} | ({"sample"} if key == SAMPLE else set()))
    if chosen not in splits:
        raise ValueError(f"dataset {key!r} has no split {chosen!r}; its splits: {', '.join(splits)}")
    return key, chosen


def is_named(source: object) -> bool:
    """True when ``source`` is a registered dataset name (and not an existing path)."""
    return (isinstance(source, str) and not Path(source).expanduser().exists()
            and parse(source.split(":")[0]) is not None)


def resolve(source: str, split: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local file that holds a named dataset's split (downloading it once when needed)."""
    parsed = parse(source, split)
    if parsed is None:
        raise ValueError(f"{source!r} is not a named dataset; names: {', '.join(DATASETS)}")
    name, split = parsed
    if name == SAMPLE:
        return paths.SAMPLE_RECORDS
    dataset = DATASETS[name]
    data = paths.data_dir()
    if data is not None and split in dataset.files:
        path = data / dataset.files[split]
        if path.is_file():
            return path
        log.info("%s is not in $KEDIT_DATA (%s)", dataset.files[split], data)
    hub = dataset.hub.get(split)
    if hub is None:
        raise DatasetUnavailable(_how_to(name, split, "it has no copy on the Hugging Face hub registered in kedit"))
    cached = paths.cache_dir(cache_dir) / "datasets" / f"{name}-{split}-{hub.revision}.json"
    if cached.is_file():
        return cached
    records = _download(name, split, hub)
    atomic_write_text(cached, json.dumps(records, ensure_ascii=False))
    log.info("%s:%s: %d records from %s@%s, cached at %s", name, split, len(records), hub.repo, hub.revision, cached)
    return cached


def _how_to(name: str, split: str, why: str) -> str:
    dataset = DATASETS[name]
    local = dataset.files.get(split)
    where = (f"set KEDIT_DATA to a folder holding {local}, or " if local else "")
    return f"dataset {name}:{split} is not available here ({why}): {where}pass the path of a local JSON/JSONL file instead"


def _download(name: str, split: str, hub: Hub) -> list[dict]:
    """The split's rows from the hub (one quick reachability check first, then ``datasets``)."""
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailable(_how_to(name, split, "loading it from the hub needs `pip install datasets`")) from None
    local_repo = Path(hub.repo).expanduser().exists()  # a local dataset folder (tests, mirrors)
    if not local_repo:
        reason = paths.hub_unreachable(hub.repo, hub.revision)
        if reason:
            raise DatasetUnavailable(_how_to(name, split, f"the Hugging Face hub is not reachable for "
                                                          f"{hub.repo}@{hub.revision}: {reason}"))
    try:
        ds = datasets.load_dataset(hub.repo, revision=None if local_repo else hub.revision, split=hub.split,
                                   data_files=hub.data_files)
    except Exception as err:  # noqa: BLE001 - any failure becomes one line
        raise DatasetUnavailable(_how_to(name, split, f"loading {hub.repo}@{hub.revision} failed: "
                                                      f"{paths.one_line(err)}")) from None
    return [dict(row) for row in ds]


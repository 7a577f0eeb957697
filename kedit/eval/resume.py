"""Checkpoints of a sequential evaluation, so that a run of hours survives being stopped.

``evaluate(..., mode="sequential", checkpoint=folder)`` saves, every ``checkpoint_every`` edited
requests and at each curve point:

* ``stack-<n>.safetensors``: the :class:`~kedit.editors.base.EditStack` of the first ``n``
  requests' edits (an ordinary edit file: ``Edit.load`` reads it);
* ``state.json``: what the run measured so far (the curve points, each edit's time, the seconds
  it took) and what a resume must match: the requests, the editor and its hyperparameters, the
  requests per edit and the scoring settings.

A run given a folder that holds a checkpoint checks that it matches, loads the stack, applies it
(each edit checks its base weights, so another model is refused) and goes on from edit ``n + 1``.
The edits made after a resume are those an uninterrupted run makes, for editors that keep their
sequence state in the stack, as kedit's do. Both files are written whole or not at all
(:mod:`kedit.atomic`); ``state.json`` names the stack it goes with, so a run killed between the two
writes resumes from the previous checkpoint. The folder's files are removed when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit.atomic import atomic_write_text
from kedit.data.request import EditRequest
from kedit.editors.base import Edit, EditStack, write_edit_file

log = logging.getLogger(__name__)

FORMAT = 1
STATE = "state.json"


class CheckpointError(ValueError):
    """The checkpoint folder holds another run's checkpoint, or a file that is not one."""


def requests_digest(requests: list[EditRequest]) -> str:
    """sha256 of the requests' prompts and targets, in order."""
    rows = [[r.prompt, r.target_new, r.target_true, r.subject] for r in requests]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass
class Resumed:
    """What a checkpoint restores: the stack (not applied), the requests edited, the seconds
    the run had taken to that point, the edit times, per-request edit fields and the curve
    points so far."""

    stack: EditStack
    done: int
    seconds: float
    edit_seconds: list[float]
    cuda_peaks: list[float]
    records: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    edit_cpu_seconds: list[float | None]


class Checkpoint:
    """The checkpoint folder of one sequential run; ``match`` is what a resume must agree with."""

    def __init__(self, folder: str | Path, match: dict[str, Any]):
        self.folder = Path(folder)
        self.match = json.loads(json.dumps(match, default=str))  # as it reads back from JSON
        self.state = self.folder / STATE

    def load(self) -> Resumed | None:
        """The saved run, checked against this one; None if the folder holds no checkpoint."""
        if not self.state.is_file():
            return None
        try:
            saved = json.loads(self.state.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{self.state}: not a kedit checkpoint ({err})") from None
        if not isinstance(saved, dict) or saved.get("kedit_checkpoint") != FORMAT:
            raise CheckpointError(f"{self.state}: not a kedit checkpoint (format {FORMAT})")
        for key in ("match", "done", "stack", "seconds", "edit_seconds", "cuda_peaks", "records", "curves"):
            if key not in saved:
                raise CheckpointError(f"{self.state}: field '{key}' is missing")
        for key, mine in self.match.items():
            if saved["match"].get(key) != mine:
                raise CheckpointError(f"{self.state}: field 'match.{key}': the checkpoint was made by another run "
                                      f"({_short(saved['match'].get(key))}; this run: {_short(mine)}). "
                                      f"Delete {self.folder} to start over, or resume with the same arguments.")
        stack = Edit.load(self.folder / saved["stack"])
        if not isinstance(stack, EditStack) or len(stack.edits) != len(saved["edit_seconds"]):
            raise CheckpointError(f"{self.folder / saved['stack']}: expected a stack of {len(saved['edit_seconds'])} "
                                  f"edits (field 'edit_seconds' of {self.state})")
        log.info("resuming from %s: %d requests edited, %d edits", self.folder, saved["done"], len(stack.edits))
        # checkpoints saved before CPU seconds were recorded have none: None for each of their edits
        cpu = saved.get("edit_cpu_seconds") or [None] * len(saved["edit_seconds"])
        return Resumed(stack=stack, done=saved["done"], seconds=saved["seconds"], edit_seconds=saved["edit_seconds"],
                       cuda_peaks=saved["cuda_peaks"], records=saved["records"], curves=saved["curves"],
                       edit_cpu_seconds=cpu)

    def save(self, stack: EditStack, done: int, seconds: float, edit_seconds: list[float], cuda_peaks: list[float],
             records: list[dict[str, Any]], curves: list[dict[str, Any]],
             edit_cpu_seconds: list[float | None] | None = None) -> None:
        """Save the run after ``done`` requests and ``seconds`` (the stack may be applied)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        old = {p.name for p in self.folder.glob("stack-*.safetensors")}
        name = f"stack-{done}.safetensors"
        write_edit_file(stack, self.folder / name)
        atomic_write_text(self.state, json.dumps({
            "kedit_checkpoint": FORMAT, "match": self.match, "done": done, "stack": name, "seconds": seconds,
            "edit_seconds": edit_seconds, "edit_cpu_seconds": edit_cpu_seconds, "cuda_peaks": cuda_peaks,
            "records": records, "curves": curves},
            default=str))
        for stale in old - {name}:
            (self.folder / stale).unlink(missing_ok=True)
        log.info("checkpoint: %d requests edited, saved to %s", done, self.folder)

    def clear(self) -> None:
        """Remove the checkpoint's files (the folder too, if nothing else is in it)."""
        self.state.unlink(missing_ok=True)
        for path in self.folder.glob("stack-*.safetensors"):
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."

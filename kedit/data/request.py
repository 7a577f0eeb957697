"""The edit request: one fact to change, with everything needed to evaluate the change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class RequestError(ValueError):
    """A bad edit request. The message names the source, the record and the field."""

    def __init__(self, message: str, *, source: str | None = None, index: int | None = None,
                 field: str | None = None):
        self.source, self.index, self.field, self.reason = source, index, field, message
        where = ", ".join(
            part for part in (
                f"file {source}" if source else None,
                f"record {index}" if index is not None else None,
                f"field {field!r}" if field else None,
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Probe:
    """A prompt and the answer expected after it (locality, portability)."""

    prompt: str
    answer: str


@dataclass
class EditRequest:
    """Make the model complete ``prompt`` with ``target_new``.

    Targets are stored without the leading space; :func:`kedit.data.encode` adds the
    separator when it tokenizes ``prompt + " " + target``.
    """

    prompt: str
    """The prompt with the subject filled in, e.g. "The capital of France is"."""
    target_new: str
    """The new answer, e.g. "Rome"."""
    subject: str | None = None
    """The subject, a substring of ``prompt`` (ROME/MEMIT edit at its last token)."""
    target_true: str | None = None
    """The answer before the edit, where known."""
    paraphrase_prompts: list[str] = field(default_factory=list)
    """Rephrasings of ``prompt`` that should also give ``target_new`` (generalization)."""
    neighborhood: list[Probe] = field(default_factory=list)
    """Prompts about other subjects whose answers must not change (locality)."""
    portability: list[Probe] = field(default_factory=list)
    """Multi-hop / reasoning questions whose answers should follow the edit."""
    generation_prompts: list[str] = field(default_factory=list)
    """Open prompts for fluency (n-gram entropy) of generated text."""
    case_id: int | str | None = None
    """The record's id in its source dataset."""

    def __post_init__(self) -> None:
        self.neighborhood = [p if isinstance(p, Probe) else Probe(**p) for p in self.neighborhood]
        self.portability = [p if isinstance(p, Probe) else Probe(**p) for p in self.portability]

    @property
    def template(self) -> str:
        """``prompt`` with the subject replaced by ``{}`` (its last occurrence), ROME-style."""
        if self.subject is None:
            raise RequestError("this request has no subject", field="subject")
        i = self.prompt.rfind(self.subject)
        if i < 0:
            raise RequestError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}",
                               field="subject")
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject):]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

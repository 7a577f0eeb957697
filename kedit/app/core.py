"""The app's logic, without the web page: one model, one shared :class:`EditStack`, one lock.

:class:`Workbench` owns the process's model. Every step that reads or changes the weights
(answers, edits, undo, restore, share, evaluation, the fingerprint) runs under one
process-wide lock, so a session never observes a half-applied edit or stack: it sees the
model before or after another session's step, never during it. The stack is shared: an edit
one tab applies is the model every tab now talks to (the history says so).

Each step that changes the model checks the result with :func:`kedit.identity.fingerprint`
against the fingerprint recorded for that number of applied edits; restoring all edits also
compares a full sha256 of every weight (:func:`kedit.identity.state_digest`) with the
unedited model's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kedit.data import EditRequest, Probe, RequestError, to_requests
from kedit.editors.base import Edit, EditMismatchError, Editor, EditStack, EditStateError
from kedit.eval.scoring import AnswerRow, answers, generate, score_targets
from kedit.identity import fingerprint, foreign_hooks, state_digest, weights_version

log = logging.getLogger(__name__)

USER_ERRORS = (RequestError, EditMismatchError, EditStateError, ValueError,
               FileNotFoundError, KeyError)
"""Errors caused by what the user typed or uploaded: shown in the page, the model unchanged."""

EXAMPLES = "counterfact-sample"
"""The packaged records the "fill from an example" choice offers."""


class AppError(RuntimeError):
    """The model is not in the state the app recorded (a restore was not bit-exact)."""


def digest(fp: tuple) -> str:
    """A short printable form of a model fingerprint."""
    return hashlib.sha256(repr(fp).encode()).hexdigest()[:12]


def lines(text: str | None) -> list[str]:
    """Non-empty stripped lines of a text box."""
    return [s.strip() for s in (text or "").splitlines() if s.strip()]


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'()") if words else ""


ONE_TIME = ("kedit.stats", "kedit.models.loading")
"""Loggers that announce one-time costs (statistics, dequantizing): forwarded to the page (as
:data:`kedit.demo.ONE_TIME` prints them)."""


@contextmanager
def forward_logs(say: Callable[[str], None], loggers: Sequence[str] = ONE_TIME) -> Iterator[None]:
    """Pass the INFO lines of ``loggers`` to ``say`` for the duration of a block."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say(record.getMessage())

    handler = Forward(logging.INFO)
    saved = []
    for name in loggers:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level))
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)


# --------------------------------------------------------------------------- editors


@dataclass
class EditorChoice:
    """A registered editor (``name``), or a trained one loaded from ``path``."""

    label: str
    name: str
    path: Path | None = None


def editor_choices(checkpoints: Path | None) -> list[EditorChoice]:
    """Every registered editor, then the trained editors (``*.safetensors``) in ``checkpoints``."""
    from kedit.checkpoint import read_artifact_meta
    from kedit.editors.base import EDITORS

    choices = [EditorChoice(name, name) for name in EDITORS]
    for path in sorted(checkpoints.glob("*.safetensors")) if checkpoints and checkpoints.is_dir() else []:
        try:
            meta = read_artifact_meta(path)
        except ValueError as err:
            log.warning("skipping %s: %s", path, err)
            continue
        choices.append(EditorChoice(f"{meta['editor']} (trained: {path.name})", meta["editor"], path))
    return choices


def hparams_yaml(hparams: Any) -> str:
    import yaml

    # one key a line, lists inline (``layers: [5]``), as the shipped configs are written
    def value(v: Any) -> str:
        text = yaml.safe_dump(v, default_flow_style=True, width=1000).strip()
        return text.removesuffix("...").strip()  # a bare scalar ends its document with "..."

    return "".join(f"{k}: {value(v)}\n" for k, v in dataclasses.asdict(hparams).items())


def parse_hparams(cls: type, text: str) -> Any:
    """Typed hyperparameters from the page's YAML, through kedit's config parser."""
    from kedit.config import load_hparams

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hyperparameters.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_hparams(cls, path)
        except ValueError as err:  # the temporary path means nothing to the user
            raise ValueError(f"hyperparameters: {str(err).replace(str(path) + ': ', '')}") from None


@functools.cache
def examples() -> list[EditRequest]:
    """The packaged records that "fill from an example" offers (no model needed)."""
    from kedit.data import load_requests

    return load_requests(EXAMPLES)


def example_labels() -> list[str]:
    return [f"{i}: {r.prompt} {r.target_true} → {r.target_new}" for i, r in enumerate(examples())]


def example_fields(label: str) -> dict[str, str]:
    r = examples()[int(label.split(":")[0])]
    return {"prompt": r.prompt, "subject": r.subject or "", "target_new": r.target_new,
            "target_true": r.target_true or "", "paraphrases": "\n".join(r.paraphrase_prompts),
            "neighbours": "\n".join(p.prompt for p in r.neighborhood[:4])}


# --------------------------------------------------------------------------- results


@dataclass
class Row(AnswerRow):
    """One prompt of the before/after comparison, with the target probabilities."""

    old: str = ""
    """The old target whose probability is shown (the record's, else the first word before)."""
    p_old: tuple[float, float | None] = (0.0, None)
    p_new: tuple[float, float | None] = (0.0, None)

    @property
    def changed(self) -> bool | None:
        return None if self.after is None else self.after != self.before


@dataclass
class HistoryRow:
    editor: str
    request: EditRequest | None
    seconds: float
    source: str = "edit"
    editor_obj: Editor | None = field(default=None, repr=False)

    @property
    def fact(self) -> str:
        r = self.request
        return "(uploaded edit)" if r is None else f"{r.prompt} → {r.target_new}"


# --------------------------------------------------------------------------- workbench


class Workbench:
    """The process's model, its shared edit stack and the lock around both."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_name: str, checkpoints: Path | None = None,
                 max_new_tokens: int = 6) -> None:
        self.model, self.tok, self.model_name = model.eval(), tokenizer, model_name
        self.max_new_tokens = max_new_tokens
        self.lock = threading.RLock()
        self.stack = EditStack()
        self.history: list[HistoryRow] = []
        self.choices = {c.label: c for c in editor_choices(checkpoints)}
        self._editors: dict[str, Editor] = {}
        self._seen: tuple[Any, tuple] = (None, ())
        """(weights_version and hook count, fingerprint) of the last fingerprint computed."""
        self.fingerprints = [self._fingerprint()]
        """``fingerprints[k]``: the model with the first k edits of the stack applied."""
        self.base_hash = state_digest(model, full=True)
        self.last_rows: list[Row] = []
        self._memo: dict[tuple, Any] = {}

    # ---- state shown in the page

    def _fingerprint(self, reuse: bool = False) -> tuple:
        """The model's fingerprint; with ``reuse``, the last one computed while no weight was
        written through its parameter since (:func:`kedit.identity.weights_version`) and the
        same hooks are installed (the state line, read after every step)."""
        key = (weights_version(self.model), foreign_hooks(self.model))
        if not (reuse and key == self._seen[0]):
            self._seen = (key, fingerprint(self.model))
        return self._seen[1]

    def snapshot(self) -> tuple[int, str]:
        """(edits applied, fingerprint digest), read atomically."""
        with self.lock:
            return len(self.stack.edits), digest(self._fingerprint(reuse=True))

    def _check(self, where: str) -> str:
        got = self._fingerprint()
        want = self.fingerprints[len(self.stack.edits)]
        if got != want:
            raise AppError(f"the model is not bit-exactly what it was with {len(self.stack.edits)} edits "
                           f"{where} (fingerprint {digest(got)} != {digest(want)})")
        return digest(got)

    # ---- editors

    def editor(self, label: str, yaml_text: str | None = None) -> Editor:
        """The editor for ``label`` (the tuned config where one ships), its hyperparameters
        replaced by ``yaml_text`` when given. Kept, so one-time statistics are paid once."""
        import kedit

        if label not in self.choices:
            raise KeyError(f"unknown editor {label!r}; choose one of {', '.join(self.choices)}")
        if label not in self._editors:
            choice = self.choices[label]
            if choice.path is not None:
                self._editors[label] = kedit.load_editor(choice.path, self.model)
            else:
                self._editors[label] = kedit.editor(choice.name, config="auto", model=self.model,
                                                    model_name=self.model_name)
        ed = self._editors[label]
        if yaml_text is not None and yaml_text.strip():
            hp = parse_hparams(type(ed.hparams), yaml_text)
            if hp != ed.hparams:
                ed.hparams = hp
        return ed

    def hparams_text(self, label: str) -> str:
        return hparams_yaml(self.editor(label).hparams)

    # ---- requests

    # the packaged examples need no model (the page offers them while the model loads)
    examples = staticmethod(examples)
    example_labels = staticmethod(example_labels)
    example_fields = staticmethod(example_fields)

    @staticmethod
    def request(prompt: str, subject: str, target_new: str, target_true: str = "", paraphrases: str = "",
                neighbours: str = "") -> EditRequest:
        """A checked :class:`EditRequest` from the page's fields (kedit's RequestError if invalid)."""
        record: dict[str, Any] = {"prompt": (prompt or "").strip(), "subject": (subject or "").strip(),
                                  "target_new": (target_new or "").strip(),
                                  "paraphrase_prompts": lines(paraphrases)}
        if (target_true or "").strip():
            record["target_true"] = target_true.strip()
        req = to_requests([record], source="the form")[0]
        # neighbours are typed without answers: the unedited model's answers fill them in (apply)
        req.neighborhood = [Probe(p, "") for p in lines(neighbours)]
        return req

    # ---- model steps (all under the lock)

    def _state_key(self) -> tuple:
        """The recorded fingerprint of the model as it stands (checked after every change)."""
        return self.fingerprints[len(self.stack.edits)]

    def _cached(self, kind: str, items: Sequence[Any], compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """Answers and scores are functions of the weights: computed once per model state.
        (Undo, restore and re-applying an edit return to a state already seen.)"""
        state = self._state_key()
        missing = list(dict.fromkeys(i for i in items if (state, kind, i) not in self._memo))
        if missing:
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo.update({(state, kind, i): v for i, v in zip(missing, compute(missing))})
        return [self._memo[(state, kind, i)] for i in items]

    def _answers(self, prompts: Sequence[str]) -> list[str]:
        def compute(ps: list[str]) -> list[str]:
            return answers(self.model, self.tok, ps, self.max_new_tokens)

        return self._cached(f"answer/{self.max_new_tokens}", list(prompts), compute)

    def _probs(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        def compute(pairs: list[tuple[str, str]]) -> list[float]:
            scores = score_targets(self.model, self.tok, [p for p, _ in pairs], [t for _, t in pairs])
            return scores.logp.exp().tolist()

        pairs = [(p, t) for p, t in zip(prompts, targets) if t]
        it = iter(self._cached("p", pairs, compute) if pairs else [])
        return [next(it) if t else 0.0 for t in targets]

    def _old_new(self, rows: list[Row], target_new: str) -> tuple[list[float], list[float]]:
        """Teacher-forced probabilities of each row's old target and of the new one (one pass)."""
        p = self._probs([r.prompt for r in rows] * 2, [r.old for r in rows] + [target_new] * len(rows))
        return p[:len(rows)], p[len(rows):]

    def _rows(self, req: EditRequest) -> list[Row]:
        """The prompts to compare, answered and scored on the model as it stands."""
        kinds = [("edit", req.prompt)] + [("paraphrase", p) for p in req.paraphrase_prompts] + \
                [("neighbour", p.prompt) for p in req.neighborhood]
        before = self._answers([p for _, p in kinds])
        rows = [Row(k, p, b) for (k, p), b in zip(kinds, before)]
        for row in rows:
            row.old = first_word(row.before)
        for row in rows[:1 + len(req.paraphrase_prompts)]:
            row.old = req.target_true or rows[0].old
        for row, probe in zip(rows[1 + len(req.paraphrase_prompts):], req.neighborhood):
            row.old = probe.answer or row.old
        p_old, p_new = self._old_new(rows, req.target_new)
        for row, a, b in zip(rows, p_old, p_new):
            row.p_old, row.p_new = (a, None), (b, None)
        return rows

    def _after(self, rows: list[Row], target_new: str) -> None:
        after = self._answers([r.prompt for r in rows])
        p_old, p_new = self._old_new(rows, target_new)
        for row, text, a, b in zip(rows, after, p_old, p_new):
            row.after, row.p_old, row.p_new = text, (row.p_old[0], a), (row.p_new[0], b)

    def _push(self, edits: Sequence[Edit]) -> None:
        """Apply ``edits`` on top of the stack; on any error the stack is as it was."""
        n = len(self.stack.edits)
        self.stack.restore(self.model)
        self.stack.edits.extend(edits)
        try:
            self.stack.apply(self.model)  # restores everything it applied if one fails
        except BaseException:
            del self.stack.edits[n:]
            self.stack.apply(self.model)
            self._check("after a refused edit")
            raise
        for _ in edits:
            self.fingerprints.append(self._fingerprint())

    def apply(self, label: str, yaml_text: str | None, request: EditRequest,
              progress: Callable[[str], None] | None = None) -> tuple[list[Row], float]:
        """Edit the model with ``request`` on top of the applied edits; return the compared
        rows and the seconds the edit took to compute."""
        say = progress or (lambda _msg: None)
        with self.lock:
            ed = self.editor(label, yaml_text)
            say("answering with the model as it stands")
            rows = self._rows(request)
            # neighbours typed without an answer: the unedited model's answer is what must not change
            request = dataclasses.replace(request, neighborhood=[
                Probe(p.prompt, p.answer or row.old) for p, row in
                zip(request.neighborhood, rows[1 + len(request.paraphrase_prompts):])])
            if request.target_true is None:
                request = dataclasses.replace(request, target_true=rows[0].old or None)
            say(f"computing the {label} edit")
            t0 = time.perf_counter()
            try:
                with forward_logs(say):  # e.g. "measuring the second moments of layers [5] ... (once ...)"
                    edit = ed.edit(self.model, self.tok, [request], history=self.stack)
            except BaseException:
                self._check("after a failed Editor.edit")  # a failure must leave the model as it was
                raise
            seconds = time.perf_counter() - t0
            self._check("after Editor.edit (it must not change the model)")
            self._push([edit])
            self.history.append(HistoryRow(label, request, seconds, "edit", ed))
            say("answering with the edited model")
            self._after(rows, request.target_new)
            self.last_rows = rows
            log.info("applied %s edit %r -> %r in %.1f s", label, request.prompt, request.target_new, seconds)
            return rows, seconds

    def answers_now(self) -> list[Row]:
        """The last compared prompts, answered by the model as it stands (after undo/restore)."""
        with self.lock:
            rows = [Row(r.kind, r.prompt, a, old=r.old) for r, a in
                    zip(self.last_rows, self._answers([r.prompt for r in self.last_rows]))]
            return rows

    def undo(self) -> str:
        with self.lock:
            if not self.stack.edits:
                raise EditStateError("there is no edit to undo")
            self.stack.restore(self.model)
            self.stack.edits.pop()
            row = self.history.pop()
            self.fingerprints.pop()
            self.stack.apply(self.model)
            fp = self._check("after undo")
            return (f"Undid {row.editor}: {row.fact}. {len(self.stack.edits)} edit(s) remain; the model's "
                    f"fingerprint {fp} is bit-exactly the one recorded before that edit.")

    def restore_all(self) -> str:
        with self.lock:
            n = len(self.stack.edits)
            self.stack.restore(self.model)
            self.stack.edits.clear()
            self.history.clear()
            del self.fingerprints[1:]
            fp = self._check("after restoring all edits")
            if state_digest(self.model, full=True) != self.base_hash:
                raise AppError("the weights' sha256 differs from the unedited model's after restoring all edits")
            return (f"Restored all {n} edit(s): the model is bit-exactly the unedited one "
                    f"(fingerprint {fp}, sha256 of all weights {self.base_hash[:12]}).")

    def chat(self, text: str, max_new_tokens: int = 32) -> str:
        if not (text or "").strip():
            raise ValueError("type a prompt to continue")
        with self.lock:
            return generate(self.model, self.tok, [text], max_new_tokens)[0]

    def download(self, what: str, folder: Path) -> Path:
        """Save the last edit (``what="last"``) or the whole stack as kedit's safetensors file."""
        with self.lock:
            if not self.stack.edits:
                raise EditStateError("there is no applied edit to download")
            n = len(self.stack.edits)
            thing = self.stack if what == "stack" else self.stack.edits[-1]
            name = f"kedit-stack-{n}-edits.safetensors" if what == "stack" else f"kedit-edit-{n}.safetensors"
            self.stack.restore(self.model)  # an edit is saved restored (kedit's rule)
            try:
                path = thing.save(Path(folder) / name)
            finally:
                self.stack.apply(self.model)
                self._check("after saving")
            return path

    def upload(self, path: str | Path) -> str:
        """Load an edit or stack file and apply it on top; one made for another model is refused."""
        with self.lock:
            loaded = Edit.load(path, self.model)  # kedit checks the base model
            edits = loaded.edits if isinstance(loaded, EditStack) else [loaded]
            if not edits:
                raise ValueError(f"{Path(path).name}: the stack holds no edits")
            self._push(edits)
            for _ in edits:
                self.history.append(HistoryRow("upload", None, 0.0, f"upload: {Path(path).name}"))
            return f"Applied {len(edits)} uploaded edit(s) from {Path(path).name}; fingerprint {self._check('after upload')}."

    def evaluate(self, progress: bool = True) -> str:
        """Single-mode evaluation of each applied edit's record with its editor, on the unedited
        model: a markdown table per editor, pre and post, teacher-forced and generation-based."""
        from kedit.eval import EvalConfig
        from kedit.eval import evaluate as run

        with self.lock:
            groups: dict[str, tuple[Editor, list[EditRequest]]] = {}
            for row in self.history:
                if row.request is not None and row.editor_obj is not None:
                    groups.setdefault(row.editor, (row.editor_obj, []))[1].append(row.request)
            if not groups:
                raise EditStateError("no applied edit with a record to evaluate (uploaded edits carry none)")
            config = EvalConfig(fluency=False, max_generation_prompts=1, ppl_docs=2, ppl_tokens=128)
            out = []
            self.stack.restore(self.model)
            try:
                for label, (ed, reqs) in groups.items():
                    res = run(self.model, self.tok, ed, reqs, mode="single", config=config, progress=progress)
                    out.append(res.to_markdown(title=f"{label}: {len(reqs)} record(s), single mode"))
            finally:
                self.stack.apply(self.model)
                self._check("after the evaluation")
            return "\n".join(out)


# --------------------------------------------------------------------------- loading


class ModelLoader:
    """Loads the model in a background thread while the page is already served.

    The page shows :meth:`status` (what loading is doing, the seconds so far) until
    :attr:`workbench` is set; :meth:`pending` stands in for the workbench meanwhile and
    refuses every step with a message the page shows.
    """

    def __init__(self, model: str, checkpoints: Path | None = None, max_new_tokens: int = 6,
                 load: Callable[[str], tuple[nn.Module, Any]] | None = None) -> None:
        from kedit.models import load_model

        self.model_name, self.checkpoints, self.max_new_tokens = model, checkpoints, max_new_tokens
        self._load = load or load_model
        self.workbench: Workbench | None = None
        self.error: BaseException | None = None
        self.messages: list[str] = []
        self.started = self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kedit-app-load", daemon=True)

    def start(self) -> ModelLoader:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> Workbench:
        """The workbench once loaded (re-raises the loading error)."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.workbench is None:
            raise TimeoutError(f"{self.model_name} is still loading after {timeout} s")
        return self.workbench

    def say(self, message: str) -> None:
        self.messages.append(message)
        log.info("%s", message)

    def _run(self) -> None:
        try:
            self.say(f"loading {self.model_name}")
            with forward_logs(self.say, ("kedit.models.loading",)):  # e.g. "dequantizing ... (once)"
                model, tok = self._load(self.model_name)
            self.say("recording the unedited model's fingerprint and sha256")
            self.workbench = Workbench(model, tok, self.model_name, checkpoints=self.checkpoints,
                                       max_new_tokens=self.max_new_tokens)
            self.seconds = time.perf_counter() - self.started
            self.say(f"loaded {self.model_name} in {self.seconds:.1f} s")
        except BaseException as err:  # noqa: BLE001 - shown in the page and re-raised by wait()
            self.error = err
            log.error("could not load %s: %s", self.model_name, err)

    def status(self) -> str:
        """One line for the page: the latest step and the seconds since loading started."""
        if self.error is not None:
            return f"could not load {self.model_name}: {self.error}"
        last = self.messages[-1] if self.messages else f"loading {self.model_name}"
        if self.workbench is not None:
            return last
        return f"{last} … ({time.perf_counter() - self.started:.0f} s)"

    def pending(self) -> Any:
        """The workbench when loaded; until then an object whose every step is refused."""
        return _Pending(self)


class _Pending:
    """Stands for a loading :class:`Workbench`: each attribute refuses with the loading status
    (an :class:`EditStateError`, shown in the page) until the model is there."""

    def __init__(self, loader: ModelLoader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        wb = self._loader.workbench
        if wb is None:
            raise EditStateError(f"the model is not loaded yet: {self._loader.status()}")
        return getattr(wb, name)

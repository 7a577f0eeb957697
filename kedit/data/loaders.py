"""Edit requests from files, lists of dicts or Hugging Face datasets, validated.

>>> requests = load_requests("counterfact-sample", limit=10)       # or "counterfact:dev", a file, ...
>>> requests, report = load_requests_with_report("zsre/zsre_dev_mend.json", on_error="skip")
>>> report.skipped[0]          # RequestError naming file, record and field

Formats (``format="auto"`` detects them from the first record's keys):

``kedit``
    EditRequest's own field names: ``prompt, target_new, subject, target_true,
    paraphrase_prompts, neighborhood [{prompt, answer}], portability [{prompt, answer}],
    generation_prompts, case_id``. Unknown keys are an error (they are usually typos).
``counterfact``
    ROME's CounterFact: ``requested_rewrite {prompt with "{}", subject, target_new.str,
    target_true.str}``, ``paraphrase_prompts``, ``neighborhood_prompts`` (answer: the true
    target), ``generation_prompts``. ``attribute_prompts`` have no EditRequest field and are
    not kept.
``counterfact_mend``
    MEND / EasyEdit CounterFact: ``prompt, subject, target_new, ground_truth,
    rephrase_prompt, locality_prompt, locality_ground_truth``.
``zsre_mend``
    MEND zsRE: ``src, subject, alt, answers, rephrase, loc ("nq question: ..."), loc_ans``
    and, where present, EasyEdit's ``portability {"New Question", "New Answer"}``. ``loc``
    loses its "nq question: " prefix and becomes a question ("Who sang ...?"). zsRE has no
    ids: ``case_id`` is the record's index in its source.
``knowedit``
    KnowEdit (ZsRE, WikiData_counterfact): ``prompt, subject, target_new, ground_truth,
    rephrase_prompt``; every ``locality`` list becomes ``neighborhood`` and every
    ``portability`` list ``portability``. List-valued answers keep their first element.
``mquake``
    MQuAKE: one EditRequest per ``requested_rewrite`` (``case_id`` = ``"<case>/<j>"``, the
    rewrite's ``question`` as paraphrase); the multi-hop ``questions`` with ``new_answer``
    are the ``portability`` of the case's LAST rewrite, since they only follow once the
    whole case is applied. :func:`load_mquake_cases` keeps the cases as groups.

Targets are stripped of surrounding whitespace (some zsRE targets carry a leading space).
Validation (:class:`RequestError` naming source, record index and field): the subject
must occur in the prompt, targets must be non-empty and ``target_new != target_true``,
every field must have its type. ``on_error="raise"`` stops at the first bad record;
``on_error="skip"`` keeps the good ones and lists the bad ones in a :class:`LoadReport`,
numbered as in the source: a bad first record does not stop the load (the format comes
from the first record that has one), and in a JSON array with syntax errors every element
that parses is kept and every one that does not is one skipped record. Where the damage
hides where the next records begin (a missing quote or bracket), skip refuses with a
:class:`RequestError` naming the line and column, rather than guess. Strings must be
encodable (no lone surrogates), integer ids have at most 18 digits, and JSON nested too
deeply to read is a RequestError for its record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kedit.data.request import EditRequest, Probe, RequestError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
FORMATS = ("kedit", "counterfact", "counterfact_mend", "zsre_mend", "knowedit", "mquake")
_FIELDS = tuple(f.name for f in dataclasses.fields(EditRequest))


@dataclass
class LoadReport:
    """What a load kept and what it skipped (with ``on_error="skip"``)."""

    source: str
    format: str = ""
    records: int = 0
    """Records read from the source (before ``limit``)."""
    loaded: int = 0
    skipped: list[RequestError] = field(default_factory=list)
    """One error per skipped record (or unreadable part of the file)."""

    def summary(self) -> str:
        return (f"{self.source}: {self.loaded} requests loaded ({self.format}), "
                f"{len(self.skipped)} records skipped")


# --------------------------------------------------------------------------- reading


def _describe(source: Any) -> str | None:
    """How errors name the source: a path, a dataset, or nothing for in-memory records."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if _is_hf_dataset(source):
        name = getattr(getattr(source, "info", None), "dataset_name", None)
        return f"<datasets.Dataset {name}>" if name else "<datasets.Dataset>"
    return None


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets"


def _json_error(src: str, err: json.JSONDecodeError, *, line: int | None = None,
                index: int | None = None) -> RequestError:
    where = f"line {line}" if line is not None else f"line {err.lineno}, column {err.colno}"
    return RequestError(f"invalid JSON at {where} (char {err.pos}): {err.msg}", source=src, index=index)


def _loads_error(text: str, pos: int, err: Exception) -> json.JSONDecodeError:
    """A JSONDecodeError (line, column) for what the json module raises as something else:
    RecursionError (nesting too deep) or ValueError (an integer of more than 4,300 digits)."""
    if isinstance(err, json.JSONDecodeError):
        return err
    if isinstance(err, RecursionError):
        return json.JSONDecodeError("nested too deeply to read", text, pos)
    digits = re.compile(r"\d{%d,}" % (sys.get_int_max_str_digits() + 1)).search(text, pos)
    return json.JSONDecodeError(f"unreadable value ({str(err).split(';')[0]})", text,
                                digits.start() if digits else pos)


_JSON_ERRORS = (json.JSONDecodeError, RecursionError, ValueError)


def _read_json_array(text: str, src: str, on_error: OnError, report: LoadReport) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except _JSON_ERRORS as err:
        if on_error == "skip":
            return _recover_array(text, src, report)
        if isinstance(err, json.JSONDecodeError):
            raise _json_error(src, err) from None
        # too deep / too long a number: the recovery finds the record it is in
        found = LoadReport(src)
        _recover_array(text, src, found)
        raise (found.skipped[0] if found.skipped else _json_error(src, _loads_error(text, 0, err))) from None
    if not isinstance(data, list):
        raise RequestError(f"expected a JSON array of records, got {type(data).__name__}", source=src)
    return list(enumerate(data))


_SPACE = " \t\r\n"


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _element_end(text: str, i: int) -> int | None:
    """Where the array element starting at ``i`` ends (its ``,`` or the array's ``]``),
    reading only strings and brackets, so that other syntax errors inside it do not matter.
    None when the file ends first (a cut, or a quote or bracket missing)."""
    depth, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return None
        elif c in "[{":
            depth += 1
        elif c in "]}" and depth > 0:
            depth -= 1
        elif c in ",]" and depth == 0:
            return i
        i += 1
    return None


_VALUE_START = '{["-0123456789tfnNI'


def _recover_array(text: str, src: str, report: LoadReport) -> list[tuple[int, Any]]:
    """``on_error="skip"`` for a JSON array with syntax errors: every element that parses is
    kept, every one that does not is one skipped record in ``report``, numbered as in the
    file. A damaged element's extent is found from strings and brackets alone. When that
    cannot tell where it ends (the file ends inside it: a cut, or a missing quote or
    bracket), the records after it cannot be told apart: a cut at the end of the file loses
    only the last record; damage earlier in the file is a RequestError that says so."""
    decoder, out = json.JSONDecoder(), []
    i, n, index = _skip_space(text, text.index("[") + 1), len(text), 0
    if text[i:i + 1] == "]":
        return out
    while i < n:
        if text[i] == "]" and index > 0:  # a trailing comma
            log.warning("%s: a ',' after the last record (char %d)", src, i)
            return out
        try:
            value, end = decoder.raw_decode(text, i)
        except _JSON_ERRORS as raw:
            err = _loads_error(text, i, raw)
            j = _element_end(text, i)
            if j is None:
                cut = not text[err.pos:].strip() or (err.msg.startswith("Unterminated string")
                                                     and '"' not in text[err.pos + 1:])
                if not cut:
                    raise RequestError(
                        f"invalid JSON at line {err.lineno}, column {err.colno} (char {err.pos}): {err.msg}; "
                        "on_error='skip' cannot tell the records after it apart (a quote or bracket is "
                        f"missing) and so cannot skip only this record: fix the file ({len(out)} records "
                        "before it are intact)", source=src, index=index) from None
                report.skipped.append(RequestError(
                    f"invalid JSON at line {err.lineno}, column {err.colno} (char {err.pos}): {err.msg} "
                    "(the file ends inside this record)", source=src, index=index))
                log.warning("%s: the file ends inside record %d; keeping the %d records before it",
                            src, index, len(out))
                return out
            report.skipped.append(_json_error(src, err, index=index))
        else:
            out.append((index, value))
            j = _skip_space(text, end)
            if j < n and text[j] in _VALUE_START:  # a missing comma: the next element follows
                log.warning("%s: no ',' after record %d (char %d)", src, index, j)
                i, index = j, index + 1
                continue
            if j < n and text[j] not in ",]":
                log.warning("%s: ignoring unexpected text after record %d (char %d)", src, index, j)
                j = _element_end(text, j)
        index += 1
        if j is None or j >= n:
            break
        if text[j] == "]":
            if text[j + 1:].strip():
                log.warning("%s: ignoring text after the array's end (char %d)", src, j + 1)
            return out
        i = _skip_space(text, j + 1)
    report.skipped.append(RequestError("the file ends before the array's closing ']' (cut?)", source=src,
                                       index=index))
    return out


def _read_jsonl(text: str, src: str, on_error: OnError, report: LoadReport) -> list[tuple[int, Any]]:
    out, index = [], -1
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        index += 1
        try:
            out.append((index, json.loads(line)))
        except _JSON_ERRORS as err:
            error = _json_error(src, _loads_error(line, 0, err), line=lineno, index=index)
            if on_error == "raise":
                raise error from None
            report.skipped.append(error)
    return out


def read_records(path: str | os.PathLike, on_error: OnError = "raise",
                 report: LoadReport | None = None) -> list[Any]:
    """The records of a JSON array or JSONL file (detected from the content, not the suffix)."""
    return [rec for _, rec in _read_file(path, on_error, report)]


def _read_file(path: str | os.PathLike, on_error: OnError = "raise",
               report: LoadReport | None = None) -> list[tuple[int, Any]]:
    """(index in the file, record) pairs: a record skipped as unreadable keeps its number."""
    path = Path(path).expanduser()
    src = str(path)
    report = report if report is not None else LoadReport(src)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"not UTF-8 text ({err})", source=src) from None
    head = text.lstrip()[:1]
    if head == "[":
        return _read_json_array(text, src, on_error, report)
    if head == "{":
        try:
            return [(0, json.loads(text))]  # one pretty-printed record
        except _JSON_ERRORS:
            return _read_jsonl(text, src, on_error, report)
    if not head:
        raise RequestError("the file is empty", source=src)
    raise RequestError(f"expected a JSON array or JSON lines, the file starts with {text.lstrip()[:20]!r}",
                       source=src)


def _records(source: Any, on_error: OnError, report: LoadReport) -> Iterable[tuple[int, Any]]:
    """(index, record) pairs of any source."""
    if isinstance(source, (str, os.PathLike)):
        return _read_file(source, on_error, report)
    if _is_hf_dataset(source):
        if not hasattr(source, "column_names") or isinstance(getattr(source, "column_names"), dict):
            raise TypeError("pass one split of a DatasetDict, e.g. ds['train']")
        return enumerate(source)
    if isinstance(source, (EditRequest, Mapping)):
        return [(0, source)]
    if isinstance(source, Iterable):
        return enumerate(source)
    raise TypeError(f"cannot read edit requests from a {type(source).__name__}; give a path, "
                    "a list of dicts / EditRequests or a datasets.Dataset")


# --------------------------------------------------------------------------- formats


def detect_format(record: Any, source: str | None = None, index: int = 0) -> str:
    """The format of a record, from its keys (see the module docstring)."""
    if isinstance(record, EditRequest):
        return "kedit"
    if not isinstance(record, Mapping):
        raise RequestError(f"a record must be a JSON object, got {type(record).__name__}", source=source,
                           index=index)
    keys = set(record)
    if "requested_rewrite" in keys:
        return "mquake" if isinstance(record["requested_rewrite"], list) else "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre_mend"
    if {"prompt", "target_new", "ground_truth"} <= keys:
        if "locality" in keys or "portability" in keys:
            return "knowedit"
        return "counterfact_mend"
    if {"prompt", "target_new"} <= keys:
        return "kedit"
    raise RequestError(
        f"unknown record format with keys {sorted(keys)}; known formats: {', '.join(FORMATS)} "
        "(EditRequest fields need at least 'prompt' and 'target_new')", source=source, index=index)


class _Record:
    """Field access on one source record that names the field in errors."""

    def __init__(self, rec: Any, src: str | None, index: int):
        if not isinstance(rec, Mapping):
            raise RequestError(f"a record must be an object, got {type(rec).__name__}", source=src, index=index)
        self.rec, self.src, self.index = rec, src, index

    def error(self, name: str, message: str) -> RequestError:
        return RequestError(message, source=self.src, index=self.index, field=name)

    def get(self, path: str, required: bool = True) -> Any:
        value: Any = self.rec
        for part in path.split("."):
            if not isinstance(value, Mapping):
                raise self.error(path, f"expected an object at {part!r}, got {type(value).__name__}")
            value = value.get(part)
            if value is None:  # HF datasets fill absent keys with None
                if required:
                    raise self.error(path, "missing")
                return None
        return value

    def str(self, path: str, required: bool = True) -> str | None:
        value = self.get(path, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {type(value).__name__} {value!r:.60}")
        return value

    def strs(self, path: str) -> list[str]:
        value = self.get(path, required=False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(path, f"expected a list of strings, got {value!r:.80}")
        return value

    def first(self, path: str, required: bool = True) -> str | None:
        """A string, or the first of a list of strings (answer aliases)."""
        value = self.get(path, required)
        if isinstance(value, list):
            if not value:
                if required:
                    raise self.error(path, "empty list")
                return None
            value = value[0]
        if value is not None and not isinstance(value, str):
            raise self.error(path, f"expected a string or list of strings, got {value!r:.60}")
        return value

    def probes(self, path: str) -> list[dict[str, Any]]:
        """KnowEdit locality/portability: {kind: [{prompt, ground_truth}]} -> probes."""
        groups = self.get(path, required=False)
        if groups is None:
            return []
        if not isinstance(groups, Mapping):
            raise self.error(path, f"expected an object of probe lists, got {type(groups).__name__}")
        out = []
        for kind, items in groups.items():
            if items is None:
                continue
            if not isinstance(items, list):
                raise self.error(f"{path}.{kind}", f"expected a list, got {type(items).__name__}")
            for j, item in enumerate(items):
                sub = _Record(item, self.src, self.index) if isinstance(item, Mapping) else None
                if sub is None:
                    raise self.error(f"{path}.{kind}[{j}]", f"expected an object, got {type(item).__name__}")
                name = f"{path}.{kind}[{j}]"
                try:
                    out.append({"prompt": sub.str("prompt"), "answer": sub.first("ground_truth"),
                                "_field": name, "_answer": "ground_truth"})
                except RequestError as err:
                    raise self.error(f"{name}.{err.field}", err.reason) from None
        return out


# Each converter returns EditRequest keyword arguments and, for error messages, the source
# field each of them came from.
Converted = tuple[dict[str, Any], dict[str, str]]


def _from_kedit(r: _Record) -> Converted:
    unknown = sorted(set(r.rec) - set(_FIELDS))
    if unknown:
        raise r.error(unknown[0], f"unknown field; EditRequest fields are {', '.join(_FIELDS)}")
    kw = {k: r.rec[k] for k in _FIELDS if r.rec.get(k) is not None}
    return kw, {}


def _from_counterfact(r: _Record) -> Converted:
    template = r.str("requested_rewrite.prompt")
    subject = r.str("requested_rewrite.subject")
    if template.count("{}") != 1:
        raise r.error("requested_rewrite.prompt", f"expected one '{{}}' subject slot in {template!r}")
    target_true = r.str("requested_rewrite.target_true.str")
    kw = {
        "prompt": template.replace("{}", subject),
        "subject": subject,
        "target_new": r.str("requested_rewrite.target_new.str"),
        "target_true": target_true,
        "paraphrase_prompts": r.strs("paraphrase_prompts"),
        "neighborhood": [{"prompt": p, "answer": target_true} for p in r.strs("neighborhood_prompts")],
        "generation_prompts": r.strs("generation_prompts"),
        "case_id": r.get("case_id", required=False),
    }
    names = {"prompt": "requested_rewrite.prompt", "subject": "requested_rewrite.subject",
             "target_new": "requested_rewrite.target_new.str",
             "target_true": "requested_rewrite.target_true.str",
             "neighborhood": "neighborhood_prompts"}
    return kw, names


def _listed(value: Any) -> list:
    """``[value]``, or ``[]`` for a missing (None) optional field."""
    return [] if value is None else [value]


def _from_counterfact_mend(r: _Record) -> Converted:
    loc = r.str("locality_prompt", required=False)
    kw = {"prompt": r.str("prompt"), "subject": r.str("subject"), "target_new": r.str("target_new"),
          "target_true": r.first("ground_truth"),
          "paraphrase_prompts": _listed(r.str("rephrase_prompt", required=False)),
          "neighborhood": [] if loc is None else [{"prompt": loc, "answer": r.first("locality_ground_truth")}],
          "case_id": r.get("case_id", required=False)}
    return kw, {"target_true": "ground_truth", "paraphrase_prompts": "rephrase_prompt",
                "neighborhood": "locality_prompt"}


NQ_PREFIX = "nq question: "


def nq_question(text: str) -> str:
    """MEND's ``"nq question: who sang ..."`` as a question: ``"Who sang ...?"``."""
    if text.startswith(NQ_PREFIX):
        text = text[len(NQ_PREFIX):]
    text = text.strip()
    if text and text[-1] not in "?.!":
        text += "?"
    return text[:1].upper() + text[1:]


def _from_zsre_mend(r: _Record) -> Converted:
    portability = r.get("portability", required=False)
    probes = []
    if portability is not None:
        question = r.str("portability.New Question", required=False)
        if question is not None:
            probes.append({"prompt": question, "answer": r.str("portability.New Answer")})
    loc = r.str("loc", required=False)
    rephrase = r.str("rephrase", required=False)
    kw = {
        "prompt": r.str("src"),
        "subject": r.str("subject"),
        "target_new": r.str("alt"),
        "target_true": r.first("answers"),
        "paraphrase_prompts": _listed(rephrase),
        "neighborhood": [{"prompt": nq_question(loc), "answer": r.str("loc_ans")}] if loc is not None else [],
        "portability": probes,
        "case_id": r.get("case_id", required=False) if "case_id" in r.rec else r.index,
    }
    return kw, {"prompt": "src", "target_new": "alt", "target_true": "answers",
                "paraphrase_prompts": "rephrase", "neighborhood": "loc", "portability": "portability"}


def _from_knowedit(r: _Record) -> Converted:
    rephrase = r.str("rephrase_prompt", required=False)
    kw = {
        "prompt": r.str("prompt"),
        "subject": r.str("subject"),
        "target_new": r.first("target_new"),
        "target_true": r.first("ground_truth", required=False),
        "paraphrase_prompts": _listed(rephrase),
        "neighborhood": r.probes("locality"),
        "portability": r.probes("portability"),
        "case_id": r.get("case_id", required=False) if "case_id" in r.rec else r.index,
    }
    return kw, {"target_true": "ground_truth", "paraphrase_prompts": "rephrase_prompt",
                "neighborhood": "locality", "portability": "portability"}


def _mquake_case(r: _Record) -> list[Converted]:
    rewrites = r.get("requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise r.error("requested_rewrite", "expected a non-empty list of rewrites")
    case_id = r.get("case_id", required=False)
    case = case_id if case_id is not None else r.index
    new_answer = r.str("new_answer")
    questions = r.strs("questions")
    out = []
    for j in range(len(rewrites)):
        p = f"requested_rewrite.{j}"
        if not isinstance(rewrites[j], Mapping):
            raise r.error(p, f"expected an object, got {type(rewrites[j]).__name__}")
        sub = _Record(rewrites[j], r.src, r.index)
        try:
            template = sub.str("prompt")
            subject = sub.str("subject")
            if template.count("{}") != 1:
                raise sub.error("prompt", f"expected one '{{}}' subject slot in {template!r}")
            question = sub.str("question", required=False)
            kw = {
                "prompt": template.replace("{}", subject),
                "subject": subject,
                "target_new": sub.str("target_new.str"),
                "target_true": sub.str("target_true.str"),
                "paraphrase_prompts": _listed(question),
                "portability": ([{"prompt": q, "answer": new_answer} for q in questions]
                                if j == len(rewrites) - 1 else []),
                "case_id": f"{case}/{j}",
            }
        except RequestError as err:
            raise r.error(f"{p}.{err.field}", err.reason) from None
        names = {k: f"{p}.{v}" for k, v in {"prompt": "prompt", "subject": "subject",
                                             "target_new": "target_new.str",
                                             "target_true": "target_true.str",
                                             "paraphrase_prompts": "question"}.items()}
        names["portability"] = "questions"
        out.append((kw, names))
    return out


_CONVERTERS: dict[str, Callable[[_Record], Converted]] = {
    "kedit": _from_kedit,
    "counterfact": _from_counterfact,
    "counterfact_mend": _from_counterfact_mend,
    "zsre_mend": _from_zsre_mend,
    "knowedit": _from_knowedit,
}


# --------------------------------------------------------------------------- validation


def _check_str(value: Any, name: str, err: Callable[[str, str], RequestError], *, strip: bool = False) -> str:
    if not isinstance(value, str):
        raise err(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if strip:
        value = value.strip()
    if not value.strip():
        raise err(name, "empty")
    _check_encodable(value, name, err)
    return value


def _check_encodable(value: str, name: str, err: Callable[[str, str], RequestError]) -> None:
    """Tokenizers take UTF-8: a lone surrogate ("\\ud800" in JSON) cannot be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise err(name, f"not valid Unicode text: {value[e.start]!r} at character {e.start} is a lone "
                        "surrogate (half of a UTF-16 pair), which no tokenizer can encode") from None


CASE_ID_DIGITS = 18
"""Longest integer ``case_id`` (ids are printed and stored in JSON results; int64 fits)."""


def _check_probes(value: Any, name: str, err: Callable[[str, str], RequestError]) -> list[Probe]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise err(name, f"expected a list of {{prompt, answer}} probes, got {type(value).__name__}")
    out = []
    for j, p in enumerate(value):
        where, answer_key = f"{name}[{j}]", "answer"
        if isinstance(p, Probe):
            prompt, answer = p.prompt, p.answer
        elif isinstance(p, Mapping):
            # converters name the source field of a probe and of its answer
            where, answer_key = p.get("_field", where), p.get("_answer", answer_key)
            keys = set(p) - {"_field", "_answer"}
            if keys != {"prompt", "answer"}:
                raise err(where, f"a probe needs exactly the keys 'prompt' and 'answer', got {sorted(keys)}")
            prompt, answer = p["prompt"], p["answer"]
        else:
            raise err(where, f"expected a {{prompt, answer}} probe, got {type(p).__name__} {p!r:.60}")
        out.append(Probe(_check_str(prompt, f"{where}.prompt", err),
                         _check_str(answer, f"{where}.{answer_key}", err, strip=True)))
    return out


def validate(kw: Mapping[str, Any], names: Mapping[str, str] | None = None, *, source: str | None = None,
             index: int | None = None) -> EditRequest:
    """EditRequest keyword arguments -> a checked :class:`EditRequest` (or :class:`RequestError`).

    ``names`` maps EditRequest fields to the source fields they came from, for the errors.
    """
    names = names or {}

    def err(name: str, message: str) -> RequestError:
        base = name.split("[")[0].split(".")[0]
        shown = names.get(base, base) + name[len(base):] if base in names else name
        return RequestError(message, source=source, index=index, field=shown)

    prompt = _check_str(kw.get("prompt"), "prompt", err) if kw.get("prompt") is not None else None
    if prompt is None:
        raise err("prompt", "missing")
    if kw.get("target_new") is None:
        raise err("target_new", "missing")
    target_new = _check_str(kw["target_new"], "target_new", err, strip=True)
    target_true = kw.get("target_true")
    if target_true is not None:
        target_true = _check_str(target_true, "target_true", err, strip=True)
        if target_true == target_new:
            raise err("target_new", f"target_new equals target_true ({target_new!r}): not an edit "
                                    "(a data issue; on_error='skip' drops such records)")
    subject = kw.get("subject")
    if subject is not None:
        subject = _check_str(subject, "subject", err)
        if subject not in prompt:
            raise err("subject", f"subject {subject!r} does not occur in prompt {prompt!r}")
    lists = {}
    for name in ("paraphrase_prompts", "generation_prompts"):
        value = kw.get(name, [])
        if not isinstance(value, (list, tuple)):
            raise err(name, f"expected a list of strings, got {type(value).__name__} {value!r:.60}")
        lists[name] = [_check_str(v, f"{name}[{j}]", err) for j, v in enumerate(value)]
    case_id = kw.get("case_id")
    if case_id is not None and (isinstance(case_id, bool) or not isinstance(case_id, (int, str))):
        raise err("case_id", f"expected an int or string, got {type(case_id).__name__}")
    if isinstance(case_id, int) and abs(case_id) >= 10 ** CASE_ID_DIGITS:
        raise err("case_id", f"an integer of more than {CASE_ID_DIGITS} digits (use a string for "
                             "longer ids)")
    if isinstance(case_id, str):
        _check_encodable(case_id, "case_id", err)
    return EditRequest(
        prompt=prompt, target_new=target_new, subject=subject, target_true=target_true,
        paraphrase_prompts=lists["paraphrase_prompts"], generation_prompts=lists["generation_prompts"],
        neighborhood=_check_probes(kw.get("neighborhood", []), "neighborhood", err),
        portability=_check_probes(kw.get("portability", []), "portability", err),
        case_id=case_id,
    )


def _convert(rec: Any, fmt: str, src: str | None, index: int) -> list[EditRequest]:
    if isinstance(rec, EditRequest):
        return [validate(dataclasses.asdict(rec), source=src, index=index)]
    r = _Record(rec, src, index)
    converted = _mquake_case(r) if fmt == "mquake" else [_CONVERTERS[fmt](r)]
    return [validate(kw, names, source=src, index=index) for kw, names in converted]


def _iter_requests(records: Iterable[tuple[int, Any]], fmt: str, src: str | None, on_error: OnError,
                   report: LoadReport, limit: int | None) -> Iterator[EditRequest]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}")
    n = 0
    for index, rec in records:
        if limit is not None and n >= limit:
            return
        report.records += 1
        try:
            if fmt == "auto":  # from the first record that has a known format
                fmt = report.format = detect_format(rec, src, index)
            requests = _convert(rec, fmt, src, index)
        except RequestError as err:
            if on_error == "raise":
                raise
            report.skipped.append(err)
            continue
        for req in requests:
            if limit is not None and n >= limit:
                return
            n += 1
            report.loaded += 1
            yield req


def load_requests_with_report(source: Any, format: str = "auto", on_error: OnError = "raise",
                              limit: int | None = None, split: str | None = None
                              ) -> tuple[list[EditRequest], LoadReport]:
    """Like :func:`load_requests`, also returning the :class:`LoadReport` (skipped records)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    source = _named(source, split)
    src = _describe(source)
    report = LoadReport(src or "<records>", format=format if format != "auto" else "")
    records = _records(source, on_error, report)
    requests = list(_iter_requests(records, format, src, on_error, report, limit))
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), report.skipped[0])
    return requests, report


def load_requests(source: Any, format: str = "auto", on_error: OnError = "raise",
                  limit: int | None = None, split: str | None = None) -> list[EditRequest]:
    """Edit requests from a named dataset, a JSON / JSONL path, a list of dicts or a ``datasets.Dataset``.

    Args:
        source: a dataset name (``"counterfact"``, ``"zsre:train"``, ``"counterfact-sample"``, ...:
            :mod:`kedit.data.named`), a file path (a JSON array or JSON lines, detected from the
            content), a list of dicts or EditRequests, or a Hugging Face ``datasets.Dataset``.
        format: ``"auto"`` (from the first record's keys) or one of :data:`FORMATS`.
        on_error: ``"raise"``: the first bad record raises :class:`RequestError` naming the
            source, record index and field. ``"skip"``: bad records are dropped (logged; see
            :func:`load_requests_with_report` for the list).
        limit: return at most this many requests (the first ones).
        split: the split of a named dataset (default: the dataset's own, e.g. ``"dev"``).
    """
    return load_requests_with_report(source, format, on_error, limit, split)[0]


def _named(source: Any, split: str | None) -> Any:
    """A registered dataset name -> its local file; anything else unchanged."""
    from kedit.data import named

    if named.is_named(source):
        return named.resolve(source, split)
    if split is not None:
        raise ValueError(f"split={split!r} applies to named datasets only ({', '.join(named.DATASETS)}), "
                         f"not to {_describe(source) or 'in-memory records'}")
    return source


def to_requests(records: Any, source: str | None = None, on_error: OnError = "raise",
                format: str = "auto") -> list[EditRequest]:
    """Plain dicts (EditRequest field names, or any known format) / EditRequests -> checked
    EditRequests. Used by every editor through ``as_requests``."""
    report = LoadReport(source or "<records>")
    if isinstance(records, (EditRequest, Mapping)):
        records = [records]
    return list(_iter_requests(enumerate(records), format, source, on_error, report, None))


# --------------------------------------------------------------------------- MQuAKE cases


@dataclass
class MQuAKECase:
    """One MQuAKE case: edits applied together, judged by multi-hop questions."""

    case_id: int | str
    requests: list[EditRequest]
    """One request per requested rewrite, in the file's order."""
    questions: list[str]
    """Multi-hop questions (paraphrases of one another)."""
    answer: str
    """Answer before the edits."""
    new_answer: str
    """Answer once all ``requests`` are applied."""
    answer_alias: list[str] = field(default_factory=list)
    new_answer_alias: list[str] = field(default_factory=list)


def load_mquake_cases(source: Any, on_error: OnError = "raise", limit: int | None = None) -> list[MQuAKECase]:
    """MQuAKE cases as groups (``limit`` counts cases); ``source`` may be the name ``"mquake"``."""
    source = _named(source, None)
    src = _describe(source)
    report = LoadReport(src or "<records>", format="mquake")
    cases = []
    for index, rec in _records(source, on_error, report):
        if limit is not None and len(cases) >= limit:
            break
        try:
            r = _Record(rec, src, index)
            requests = [validate(kw, names, source=src, index=index) for kw, names in _mquake_case(r)]
            case_id = r.get("case_id", required=False)
            cases.append(MQuAKECase(
                case_id=case_id if case_id is not None else index, requests=requests,
                questions=r.strs("questions"), answer=r.str("answer"), new_answer=r.str("new_answer"),
                answer_alias=r.strs("answer_alias"), new_answer_alias=r.strs("new_answer_alias")))
        except RequestError as err:
            if on_error == "raise":
                raise
            report.skipped.append(err)
    if report.skipped:
        log.warning("%s: %d MQuAKE cases skipped; first: %s", report.source, len(report.skipped), report.skipped[0])
    return cases

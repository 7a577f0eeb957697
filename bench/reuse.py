"""Reuse the pre-edit scores of an earlier benchmark run (``--reuse-pre <result.json>``).

The pre-edit pass measures the unedited model, so runs of other editors or hyperparameters on
the same records and evaluation settings can take it from an earlier result file instead of
measuring it again. ``kedit.eval.evaluate(reuse_pre=...)`` checks the records and settings.
"""

from __future__ import annotations

import json
from pathlib import Path


def reused_pre(path: str | None, n: int):
    """The Results in a bench result JSON, cut to its first ``n`` records (None: no file).

    The file is either ``{"results": ...}`` (bench_rome) or ``{"<editor>": {"results": ...}}``
    (bench_memit: the first editor's).
    """
    if path is None:
        return None
    from kedit.eval import Results

    payload = json.loads(Path(path).read_text())
    if "results" not in payload:
        payload = next(v for k, v in payload.items() if k != "args")
    res = Results.from_json(json.dumps(payload["results"]))
    if len(res.per_request) < n:
        raise ValueError(f"{path}: {len(res.per_request)} records, fewer than {n}; --reuse-pre needs the same records")
    res.per_request = res.per_request[:n]
    return res

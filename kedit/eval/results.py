"""The result of an evaluation run (summary pre/post, per-request scores, curves, meta) and
what is made of it: markdown tables, a table comparing runs, curve plots, W&B logging."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Display order and one-line meaning of each metric key (``split/name``).
METRICS: dict[str, str] = {
    "rewrite/es": "efficacy: P(new) > P(true) on the edit prompt (mean per-token NLL)",
    "rewrite/acc": "teacher-forced token accuracy of target_new on the edit prompt",
    "rewrite/exact": "all target_new tokens are the argmax (teacher-forced)",
    "rewrite/gen": "greedy generation starts with target_new",
    "rewrite/p_new": "per-token probability of target_new (exp of -mean NLL)",
    "paraphrase/es": "generalization: P(new) > P(true) on paraphrases",
    "paraphrase/acc": "teacher-forced token accuracy of target_new on paraphrases",
    "paraphrase/exact": "all target_new tokens are the argmax on paraphrases",
    "paraphrase/gen": "greedy generation on paraphrases starts with target_new",
    "neighborhood/ns": "specificity: P(true answer) > P(new) on neighborhood prompts",
    "neighborhood/acc": "teacher-forced token accuracy of the true answer on neighborhood prompts",
    "neighborhood/agree": "post-edit top-1 tokens equal pre-edit ones over the answer (locality)",
    "neighborhood/kl": "KL(pre || post) of the next-token distribution after neighborhood prompts",
    "neighborhood/gen": "greedy generation on neighborhood prompts starts with the true answer",
    "portability/acc": "teacher-forced token accuracy of portability answers",
    "portability/exact": "all portability answer tokens are the argmax",
    "portability/gen": "greedy generation on portability questions starts with the answer",
    "fluency/ngram_entropy": "ROME's weighted bi/tri-gram entropy of greedy generations",
    "general/ppl": "perplexity on held text",
}
LOWER_IS_BETTER = {"neighborhood/kl", "general/ppl"}


def fmt(value: Any, key: str = "") -> str:
    """A metric value as the tables show it ("-" for none or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "general/ppl" or key.endswith("entropy"):
        return f"{value:.2f}"
    if key.endswith("kl"):
        return f"{value:.4f}"
    return f"{value:.3f}"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class Results:
    """What :func:`kedit.eval.evaluate` measured.

    ``summary["pre"]`` / ``summary["post"]`` map metric keys to means over requests
    (NaN where no request had that kind of prompt); ``summary["n"]`` counts the requests
    behind each mean. ``per_request`` holds each request's pre/post scores and edit time,
    ``curves`` the sequential-mode checkpoints, ``meta`` the run's settings, timing and memory.
    """

    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    per_request: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def to_json(self, path: str | Path | None = None, indent: int = 1) -> str:
        """The results as JSON (NaN written as null); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Results:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text(encoding="utf-8")
        data = json.loads(text)
        nan = float("nan")
        summary = {k: {m: nan if v is None else v for m, v in d.items()} for k, d in data["summary"].items()}
        return cls(summary=summary, per_request=data.get("per_request", []), curves=data.get("curves", []),
                   meta=data.get("meta", {}))

    def table_rows(self) -> list[tuple[str, str, str, str]]:
        pre, post, n = self.summary.get("pre", {}), self.summary.get("post", {}), self.summary.get("n", {})
        keys = [k for k in METRICS if k in post or k in pre] + sorted((set(post) | set(pre)) - set(METRICS))
        rows = []
        for key in keys:
            a, b = pre.get(key, float("nan")), post.get(key, float("nan"))
            if all(isinstance(v, float) and math.isnan(v) for v in (a, b)):
                continue
            rows.append((key, fmt(a, key), fmt(b, key), str(int(n.get(key, 0))) if key in n else "-"))
        return rows

    def to_markdown(self, title: str | None = None) -> str:
        """A markdown table of pre- and post-edit means, then timing and memory."""
        m = self.meta
        lines = []
        if title:
            lines += [f"### {title}", ""]
        lines += ["| metric | pre | post | n |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {k} | {a} | {b} | {n} |" for k, a, b, n in self.table_rows()]
        lines.append("")
        facts = []
        for label, key, form in (("mode", "mode", "{}"), ("editor", "editor_name", "{}"), ("model", "model", "{}"),
                                ("requests", "n_requests", "{}"), ("edits", "n_edits", "{}"),
                                ("edit s (mean)", "edit_seconds_mean", "{:.2f}"),
                                ("edit s (median)", "edit_seconds_median", "{:.2f}"),
                                ("edit CPU s (mean)", "edit_cpu_seconds_mean", "{:.2f}"),
                                ("edit s (total)", "edit_seconds_total", "{:.1f}"),
                                ("eval s (total)", "eval_seconds", "{:.1f}"),
                                ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
                                ("peak CUDA MB (edit)", "cuda_peak_mb", "{:.0f}"), ("device", "device", "{}")):
            if m.get(key) is not None:
                facts.append(f"{label}: {form.format(m[key])}")
        if facts:
            lines.append("; ".join(facts))
        if self.curves:
            keys = [k for k in self.curves[-1] if k != "n_edits"]
            lines += ["", "| edits | " + " | ".join(keys) + " |", "| ---: |" + " ---: |" * len(keys)]
            for point in self.curves:
                lines.append(f"| {point['n_edits']} | " + " | ".join(fmt(point.get(k), k.split(':')[-1])
                                                                     for k in keys) + " |")
        return "\n".join(lines) + "\n"


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def compare_markdown(runs: Mapping[str, Results]) -> list[str]:
    """Markdown rows comparing runs on the same requests: one column of pre-edit scores (the
    first run's) and one column of post-edit scores per run, then edit time and memory."""
    names = list(runs)
    first = runs[names[0]].summary
    lines = ["| metric | pre | " + " | ".join(names) + " |", "| --- | ---: |" + " ---: |" * len(names)]
    for key in METRICS:
        if key in first.get("post", {}) or key in first.get("pre", {}):
            lines.append(f"| {key} | {fmt(first['pre'].get(key), key)} | "
                         + " | ".join(fmt(runs[n].summary["post"].get(key), key) for n in names) + " |")
    # seconds per request, not per edit call: a batch edit covers all requests (older results lack the key)
    meta = {n: {"edit_seconds_per_request": runs[n].meta.get("edit_seconds_mean"),
                "edit_seconds_median": _median(runs[n].meta.get("edit_seconds")), **runs[n].meta} for n in names}
    for label, key, form in (("edit seconds / request", "edit_seconds_per_request", "{:.2f}"),
                             ("edit seconds / edit (median)", "edit_seconds_median", "{:.2f}"),
                             ("edit CPU seconds / edit (mean)", "edit_cpu_seconds_mean", "{:.2f}"),
                             ("peak RSS MB (process)", "peak_rss_mb", "{:.0f}"),
                             ("peak CUDA MB (edit)", "cuda_peak_mb", "{:.0f}"),
                             ("eval wall seconds", "wall_seconds", "{:.0f}")):
        if any(meta[n].get(key) is not None for n in names):
            lines.append(f"| {label} | | " + " | ".join(
                "-" if meta[n].get(key) is None else form.format(meta[n][key]) for n in names) + " |")
    return lines


def plot_curves(results: Results, path: str | Path) -> Path:
    """PNG of the sequential retention curves (left axis) and perplexity (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = results.curves
    if not curves:
        raise ValueError("no curves to plot (only sequential mode records them)")
    x = [c["n_edits"] for c in curves]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in [k for k in curves[-1] if ":" in k]:
        ax.plot(x, [c.get(key, float("nan")) for c in curves], marker="o", label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("edits applied")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(x, [c.get("general/ppl", float("nan")) for c in curves], "k--", marker="s", label="perplexity")
    ax2.set_ylabel("perplexity (held text)")
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.set_title(f"{results.meta.get('editor_name')} on {results.meta.get('model')}: sequential editing")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_wandb(results: Results, project: str, config: Mapping[str, Any] | None = None) -> None:
    """Log a run to W&B: summary pre/post, edit time, memory, and the curves by edit count.

    Online when ``WANDB_API_KEY`` is set or ``wandb login`` wrote ~/.netrc (as the trainers'
    :class:`kedit.lightning.common.WandbLogger`), else offline (``wandb sync`` uploads it later);
    ``WANDB_MODE`` in the environment wins over both."""
    from kedit.lightning.wandb_tmp import import_wandb
    from kedit.utils import wandb_mode

    import_wandb()
    import wandb

    mode = wandb_mode()
    if mode == "offline":
        log.info("no W&B key configured: logging offline (upload later with `wandb sync`)")
    meta = {k: v for k, v in results.meta.items() if k not in ("edit_seconds", "edit_cpu_seconds", "metrics")}
    run = wandb.init(project=project, mode=mode, config={**(config or {}), "meta": meta},
                     name=f"{results.meta['editor_name']}-{results.meta['mode']}")
    flat = {f"{side}/{k}": v for side in ("pre", "post") for k, v in results.summary[side].items()}
    flat.update({"edit_seconds_mean": results.meta.get("edit_seconds_mean"),
                 "peak_rss_mb": results.meta.get("peak_rss_mb")})
    run.summary.update({k: v for k, v in flat.items() if v is not None})
    for point in results.curves:
        run.log({f"curve/{k}": v for k, v in point.items() if k != "n_edits"}, step=point["n_edits"])
    run.finish()

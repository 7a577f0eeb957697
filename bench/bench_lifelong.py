"""Lifelong editing (issue 18): 1,000 zsRE edits on SmolLM2-135M, one at a time, for any registered editor.

    export KEDIT_DATA=/work/shared/data OMP_NUM_THREADS=1
    python bench/bench_lifelong.py --editor memit alphaedit grace wise ultraedit --config auto
    python bench/bench_lifelong.py --editor memit alphaedit --config auto --hparams '{"norm_anchor": true}' --tag nas
    python bench/bench_lifelong.py --editor ultraedit --per-edit 100 --tag turns100   # the paper's turns of 100
    python bench/bench_lifelong.py --compare          # the comparison table of the runs saved so far

Requests: ``zsre:dev`` (zsre_dev_mend) then ``zsre:train`` (zsre_train_mend), invalid records
skipped (and counted), the first ``--n``. ``kedit.eval.evaluate`` in sequential mode, one request
per edit (``--per-edit``), each edit computed on the model edited by all the ones before (``history``). At each
curve point (``--curve-at``, default 10, 100, 500, 1,000 edits; :class:`EvalConfig` ``curve_at``,
``curve_full``), for the requests edited so far:

* rewrite and paraphrase success, teacher-forced (``es``: P(new) > P(true); ``acc``: token
  accuracy) and generation-based (``gen``: the greedy answer starts with the target);
* retention of the first edits (``first10:``: the first 10 requests, on the model as it is now);
* locality (``neighborhood/agree``: on zsRE's NQ questions, the top-1 tokens agree with the
  unedited model's; ``neighborhood/kl``);
* perplexity on held text (``general/ppl``), and the mean edit time so far (``edit_seconds_mean``).

Writes to ``--out`` (default bench/results), per run ``lifelong_<editor>[_<tag>]_<n>``: ``.json``
(args, data report, results; a ``.partial.json`` with the curve so far while it runs), ``.md`` and
``.png`` (the curves), then ``lifelong_compare_<n>.md`` over every run of that size in ``--out``.
Several editors in one call share the pre-edit pass (``reuse_pre``). A run saves its edit stack and
what it measured every ``--checkpoint-every`` edits to ``$KEDIT_CACHE/bench_lifelong/<run>``; run the
same command again to resume a stopped run (``kedit.eval.evaluate``'s ``checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
DATASETS = ("zsre:dev", "zsre:train")
CURVE_KEYS = ("seen:rewrite/es", "seen:rewrite/acc", "seen:rewrite/gen", "seen:paraphrase/es", "seen:paraphrase/acc",
              "seen:paraphrase/gen", "first:rewrite/acc", "seen:neighborhood/agree", "general/ppl", "edit_seconds_mean")
"""The columns of the comparison of curves: keys of the curve points (``first:``: the retention of the
first edits, ``first<k>:`` with k the first curve point)."""

log = logging.getLogger("bench_lifelong")


def load_stream(n: int, datasets: tuple[str, ...] = DATASETS) -> tuple[list, dict]:
    """The first ``n`` valid requests of ``datasets`` in order, and how many records each gave or skipped."""
    from kedit.data.loaders import load_requests_with_report

    reqs, report = [], {}
    for name in datasets:
        if len(reqs) >= n:
            break
        got, rep = load_requests_with_report(name, on_error="skip")
        report[name] = {"valid": len(got), "skipped": len(rep.skipped)}
        log.info("%s: %d valid records, %d skipped", name, len(got), len(rep.skipped))
        reqs += got
    if len(reqs) < n:
        raise ValueError(f"only {len(reqs)} valid records in {', '.join(datasets)}; asked for --n {n}")
    return reqs[:n], report


def run_name(editor: str, tag: str, n: int) -> str:
    return f"lifelong_{editor}{'_' + tag if tag else ''}_{n}"


def run(args, model, tok, editor_name: str, reqs: list, report: dict, pre=None):
    """One editor's sequential run; writes its JSON, markdown and plot; returns the Results."""
    import kedit
    from kedit.eval import EvalConfig, evaluate
    from kedit.eval.results import plot_curves

    name = run_name(editor_name, args.tag, len(reqs))
    editor = kedit.editor(editor_name, config=args.config, model=model, **json.loads(args.hparams))
    cfg = EvalConfig(curve_at=args.curve_at, curve_full=True, generation=args.generation, fluency=False)
    partial, curve = args.out / f"{name}.partial.json", []

    def save_point(point: dict) -> None:  # a run killed by a deadline keeps its curve so far
        curve.append(point)
        partial.write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1, default=str))

    checkpoint = None
    if args.checkpoint_every >= 0:
        from kedit.paths import cache_dir

        checkpoint = cache_dir() / "bench_lifelong" / name
        cfg.checkpoint_every = args.checkpoint_every  # a resumed run replays its saved points through save_point
    t0 = time.perf_counter()
    res = evaluate(model, tok, editor, reqs, mode="sequential", batch_size=args.per_edit, config=cfg,
                   on_curve=save_point, reuse_pre=pre, checkpoint=checkpoint)
    wall = time.perf_counter() - t0 + res.meta["resumed_seconds"]  # + the stopped runs' time to their checkpoint
    payload = {"args": vars(args), "editor": editor_name, "data": report, "run_wall_seconds": wall,
               "results": res.to_dict()}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    skipped = sum(r["skipped"] for r in report.values())
    per = f", {args.per_edit} requests per edit" if args.per_edit > 1 else ""
    title = (f"{editor_name}{' (' + args.tag + ')' if args.tag else ''}: {len(reqs)} sequential zsRE edits{per}, "
             f"{args.model}")
    md = res.to_markdown(title=title) + (f"\ndata: {json.dumps(report)} ({skipped} invalid records skipped); "
                                         f"run wall time {wall:.0f} s; config {args.config}; "
                                         f"hparams overrides {args.hparams}\n")
    (args.out / f"{name}.md").write_text(md)
    plot_curves(res, args.out / f"{name}.png")
    partial.unlink(missing_ok=True)
    log.info("%s: %.0f s wall\n%s", name, wall, md)
    return res


def compare(out: Path, n: int) -> Path | None:
    """``lifelong_compare_<n>.md``: the final scores of every saved run of ``n`` edits side by side
    (:func:`kedit.eval.results.compare_markdown`), then their curve points."""
    from kedit.eval import Results
    from kedit.eval.results import compare_markdown, fmt

    runs, walls, curves, models = {}, {}, {}, set()
    for path in sorted(out.glob(f"lifelong_*_{n}.json")):
        payload = json.loads(path.read_text())
        label = path.stem.removeprefix("lifelong_").removesuffix(f"_{n}")
        runs[label] = Results.from_json(json.dumps(payload["results"]))
        walls[label] = payload.get("run_wall_seconds")
        curves[label] = runs[label].curves
        models.add(runs[label].meta.get("model"))
    for path in sorted(out.glob(f"lifelong_*_{n}.partial.json")):  # runs stopped (or still going)
        label = path.name.removeprefix("lifelong_").removesuffix(f"_{n}.partial.json")
        if label not in runs:
            payload = json.loads(path.read_text())
            curves[f"{label} (partial)"] = payload["curve"]
            models.add(payload["args"].get("model"))
    if not curves:
        return None
    lines = [f"## Lifelong editing: {n} sequential zsRE edits, {', '.join(sorted(map(str, models)))}", ""]
    if runs:
        lines += ["Final scores (every request on the whole stack):", ""] + compare_markdown(runs)
        lines.append("| run wall seconds | | " + " | ".join("-" if walls[r] is None else f"{walls[r]:.0f}"
                                                         for r in runs) + " |")
        lines.append("")
    lines += ["Curves (seen: the requests edited so far; first: the first edits, as many as at the first point; "
              "partial: a run stopped before its last point):", "",
              "| run | edits | " + " | ".join(CURVE_KEYS) + " |", "| --- | ---: |" + " ---: |" * len(CURVE_KEYS)]
    for label, points in curves.items():
        for point in points:
            first = {f"first:{k.split(':')[-1]}": v for k, v in point.items() if k.startswith("first")}
            lines.append(f"| {label} | {point['n_edits']} | "
                         + " | ".join(fmt({**point, **first}.get(k), k.split(":")[-1]) for k in CURVE_KEYS) + " |")
    path = out / f"lifelong_compare_{n}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editor", nargs="+", default=[], help="registered editor names (kedit.editors.EDITORS)")
    p.add_argument("--config", default="auto", help='"auto" (the tuned YAML for SmolLM2), a shipped config name, '
                                                     'a YAML path, or "none" (the dataclass defaults)')
    p.add_argument("--hparams", default="{}", help="JSON of hyperparameter overrides for every editor")
    p.add_argument("--tag", default="", help="suffix of the result files (runs with other --hparams)")
    p.add_argument("--n", type=int, default=1000, help="edits (valid records of zsre:dev, then zsre:train)")
    p.add_argument("--curve-at", type=int, nargs="+", default=[10, 100, 500, 1000])
    p.add_argument("--per-edit", type=int, default=1, help="requests per edit (UltraEdit's paper: 100 per turn); "
                                                          "curve points must be multiples of it")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compare", action="store_true", help="only rebuild lifelong_compare_<n>.md from saved runs")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="save the run every this many edited requests (and at the curve points) to "
                        "$KEDIT_CACHE/bench_lifelong/<run>; the same command resumes a stopped run from there; "
                        "0: at the curve points only; -1: no checkpoints")
    p.add_argument("--reuse-pre", default=None,
                   help="a saved run's JSON (same --n): take its pre-edit scores instead of measuring them again")
    args = p.parse_args()
    args.config = None if args.config == "none" else args.config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.compare:
        if not args.editor:
            p.error("--editor is required (or --compare)")
        import kedit

        torch.set_num_threads(args.threads)
        model, tok = kedit.load_model(args.model)
        reqs, report = load_stream(args.n)
        from reuse import reused_pre

        pre = reused_pre(args.reuse_pre, len(reqs))
        for name in args.editor:
            pre = run(args, model, tok, name, reqs, report, pre)
    path = compare(args.out, args.n)
    log.info("comparison: %s", path)


if __name__ == "__main__":
    main()

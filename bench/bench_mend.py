"""Benchmark a trained MEND editor: edit quality, one-shot edit time, training throughput.

    OMP_NUM_THREADS=2 python bench/bench_mend.py --editor checkpoints/mend-smollm2-135m-counterfact.safetensors

Quality (kedit.eval, single-edit mode, teacher-forced and generation-based) on the
``edit``-split records of counterfact_dev_mend.json and on counterfact_dev_rome.json.
Time: seconds per one-shot edit (``editor.edit``) against one forward + full backward of
the base model on the same edit example. ``--train-log`` adds the training run's
throughput and peak memory and a learning curve from a Lightning CSVLogger metrics.csv.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from kedit import paths

import kedit
from kedit.data.encode import encode, model_inputs
from kedit.data.loaders import load_requests, read_records
from kedit.eval import evaluate
from kedit.eval.results import fmt

log = logging.getLogger("bench_mend")
ROOT = Path(__file__).resolve().parents[1]
KEYS = ["rewrite/es", "rewrite/exact", "rewrite/gen", "paraphrase/es", "paraphrase/exact", "paraphrase/gen",
        "neighborhood/ns", "neighborhood/agree", "neighborhood/gen", "neighborhood/kl"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_edits(model, tok, editor, requests, device, n: int) -> dict[str, float]:
    """Median seconds of editor.edit vs one forward+backward of the base model, same examples."""
    edit_s, fb_s, fwd_s = [], [], []
    params = [p for p in model.parameters()]
    for r in requests[: n + 2]:
        sync(device)
        t = time.perf_counter()
        editor.edit(model, tok, r)
        sync(device)
        edit_s.append(time.perf_counter() - t)
        batch = encode(tok, [r.prompt], [r.target_new], device=device)
        for p in params:
            p.requires_grad_(True)
        sync(device)
        t = time.perf_counter()
        model(**model_inputs(batch)).loss.backward()
        sync(device)
        fb_s.append(time.perf_counter() - t)
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model(**model_inputs(batch))
        sync(device)
        fwd_s.append(time.perf_counter() - t)
    edit_s, fb_s, fwd_s = edit_s[2:], fb_s[2:], fwd_s[2:]  # drop warm-up
    return {"edit_s": statistics.median(edit_s), "fwd_bwd_s": statistics.median(fb_s),
            "fwd_s": statistics.median(fwd_s), "edit_over_fwd_bwd": statistics.median(edit_s) / statistics.median(fb_s),
            "n_timed": len(edit_s)}


def read_train_log(path: Path) -> dict:
    rows = list(csv.DictReader(path.open()))
    curve, val, perf = [], [], {}
    for row in rows:
        step = int(float(row.get("step") or 0))
        if row.get("train/edit_nll"):
            curve.append({"step": step, **{k: float(row[k]) for k in ("train/loss", "train/edit_nll", "train/loc_kl",
                                                                       "train/edit_success", "train/alpha_mean")
                                           if row.get(k)}})
        if row.get("val/edit_success"):
            val.append({"step": step, **{k: float(v) for k, v in row.items() if k.startswith("val/") and v}})
        for k in ("perf/steps_per_s", "perf/peak_mem_mb"):
            if row.get(k):
                perf[k] = float(row[k])
    return {"train_curve": curve[:: max(1, len(curve) // 40)], "val_curve": val, **perf,
            "steps": max((c["step"] for c in curve), default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", default=str(ROOT / "checkpoints" / "mend-smollm2-135m-counterfact.safetensors"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="folder of the CounterFact files (default: $KEDIT_DATA/counterfact)")
    ap.add_argument("--n-mend", type=int, default=200, help="edit-split records of counterfact_dev_mend.json")
    ap.add_argument("--n-rome", type=int, default=200, help="records of counterfact_dev_rome.json")
    ap.add_argument("--n-timing", type=int, default=20)
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train-log", default=None, help="metrics.csv of the training run (CSVLogger)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mend"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    device = torch.device(args.device)
    model, tok = kedit.load_model(args.model, device=device)
    editor = kedit.load_editor(args.editor, model=model)
    data = Path(args.data_dir) if args.data_dir else paths.data_dir(required=True) / "counterfact"
    mend_records = [r for r in read_records(data / "counterfact_dev_mend.json") if r.get("mend_split") == "edit"]
    sets = {
        "counterfact_dev_mend[edit]": load_requests(mend_records[: args.n_mend], format="counterfact_mend"),
        "counterfact_dev_rome": load_requests(data / "counterfact_dev_rome.json", limit=args.n_rome),
    }
    report: dict = {"editor": args.editor, "model": args.model, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "torch_threads": torch.get_num_threads(), "sets": {}}
    timing = time_edits(model, tok, editor, sets["counterfact_dev_rome"], device, args.n_timing)
    report["timing"] = timing
    for name, reqs in sets.items():
        log.info("%s: %d requests, one edit each, scored before and after", name, len(reqs))
        t = time.perf_counter()
        res = evaluate(model, tok, editor, reqs, mode="single", generation=not args.no_generation, fluency=False,
                       perplexity=False, progress=True)
        report["sets"][name] = {"n": len(reqs), "pre": {k: res.summary["pre"].get(k) for k in KEYS},
                                "post": {k: res.summary["post"].get(k) for k in KEYS},
                                "seconds": time.perf_counter() - t}
    if args.train_log:
        report["training"] = read_train_log(Path(args.train_log))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(report, default=float).replace("NaN", "null"))
    out.with_suffix(".json").write_text(json.dumps(clean, indent=1))
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))


def to_markdown(r: dict) -> str:
    lines = [f"# MEND on {r['model']} ({r['device']}: {r['device_name']})", "",
             f"editor: `{r['editor']}`", "",
             "| set | n | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for name, s in r["sets"].items():
        for when in ("pre", "post"):
            lines.append(f"| {name} ({when}) | {s['n']} | " + " | ".join(fmt(s[when].get(k), k) for k in KEYS) + " |")
    t = r["timing"]
    lines += ["", f"one-shot edit: {t['edit_s'] * 1e3:.1f} ms (median of {t['n_timed']}); base forward+backward: "
              f"{t['fwd_bwd_s'] * 1e3:.1f} ms; forward: {t['fwd_s'] * 1e3:.1f} ms; ratio edit / (fwd+bwd) = "
              f"{t['edit_over_fwd_bwd']:.2f}"]
    if "training" in r:
        tr = r["training"]
        lines += ["", f"training: {tr['steps']} steps, {tr.get('perf/steps_per_s', float('nan')):.2f} steps/s, "
                  f"peak memory {tr.get('perf/peak_mem_mb', float('nan')):.0f} MB", "",
                  "| step | " + " | ".join(k for k in tr["val_curve"][0] if k != "step") + " |" if tr["val_curve"] else ""]
        if tr["val_curve"]:
            keys = [k for k in tr["val_curve"][0] if k != "step"]
            lines.append("|---|" + "---|" * len(keys))
            for v in tr["val_curve"]:
                lines.append(f"| {v['step']} | " + " | ".join(fmt(v.get(k), k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

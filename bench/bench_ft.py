"""Fine-tuning baselines (FT-L, FT-M, LoRA) on SmolLM2-135M, single-edit mode, CounterFact.

    python bench/bench_ft.py                       # first 100 records of counterfact_dev_rome.json
    python bench/bench_ft.py --limit 20 --editors ft-m lora --threads 1

Every metric of ``kedit.eval`` pre and post, edit seconds per request and peak memory, for
each editor with its default hyperparameters. The pre-edit scores are measured once and
reused for the other editors (same model, requests and settings). Writes
``bench/results/ft.json`` and ``bench/results/ft.md`` (after each editor, so a cut-off run
keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from kedit import paths

ROOT = Path(__file__).resolve().parents[1]
DATA = paths.data_dir(required=True)  # the development data: $KEDIT_DATA (kedit.paths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DATA / "counterfact" / "counterfact_dev_rome.json"))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--editors", nargs="+", default=["ft-l", "ft-m", "lora"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--name", default="ft", help="output file stem")
    p.add_argument("--ppl-path", help="held text (default: the Wikipedia sample shipped with kedit, kedit.paths.HELD_TEXT)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="no run: rebuild <name>.json/.md from per-editor result files of earlier runs "
                        "(e.g. runs split across machines or calls)")
    p.add_argument("--note", default="", help="--merge: where/how the runs were made (goes in the table header)")
    args = p.parse_args()
    if args.merge:
        return merge(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    import kedit
    from kedit.data.loaders import load_requests
    from kedit.eval import EvalConfig, evaluate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = kedit.load_model(args.model, device=device)
    requests = load_requests(args.data, limit=args.limit)
    cfg = EvalConfig(ppl_path=args.ppl_path)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    runs: dict = {}
    pre = None
    for name in args.editors:
        editor = kedit.editor(name)
        t0 = time.perf_counter()
        res = evaluate(model, tok, editor, requests, mode="single", config=cfg, reuse_pre=pre)
        res.meta.update(wall_seconds=time.perf_counter() - t0, bench_editor=name)
        pre = pre or res
        runs[name] = res
        (out_dir / f"{args.name}-{name}.json").write_text(res.to_json() + "\n")
        write(out_dir, args, env, runs)
        logging.info("%s done in %.0f s", name, res.meta["wall_seconds"])
    print((out_dir / f"{args.name}.md").read_text())


def merge(args) -> None:
    from kedit.editors import EDITORS
    from kedit.eval import Results

    runs = {}
    for path in args.merge:
        res = Results.from_json(path)
        cls = res.meta.get("editor_name")
        name = res.meta.get("bench_editor") or next((k for k, v in EDITORS.items() if v.endswith(f":{cls}")), cls)
        runs[name] = res
    env = {"device": "see note", "gpu": None, "cpu": "", "threads": "-", "command": args.note}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write(out_dir, args, env, runs)
    print((out_dir / f"{args.name}.md").read_text())


def write(out_dir: Path, args, env: dict, runs: dict) -> None:
    """``<name>.json`` (each editor's summary and meta) and ``<name>.md`` (the comparison table)."""
    from kedit.eval.results import compare_markdown

    keep = ("edit_seconds_mean", "edit_seconds_total", "eval_seconds", "wall_seconds", "peak_rss_mb", "cuda_peak_mb",
            "hparams", "n_requests", "device")
    summary = {name: {**r.to_dict()["summary"], **{k: r.meta.get(k) for k in keep}} for name, r in runs.items()}
    (out_dir / f"{args.name}.json").write_text(json.dumps(
        {"model": args.model, "data": args.data, "limit": args.limit, "env": env, "summary": summary,
         "per_request_files": {n: f"{args.name}-{n}.json" for n in runs}}, indent=1) + "\n")
    first = next(iter(runs.values())).summary
    lines = [f"# Fine-tuning baselines: {args.model}, single mode, first {first['n'].get('rewrite/es', '?')} "
             f"records of {Path(args.data).name}", "",
             (f"runs: {env['command']}" if env["device"] == "see note" else
              f"device: {env['device']} {env['gpu'] or env['cpu']}, torch threads {env['threads']}; "
              f"`{env['command']}`"), "", *compare_markdown(runs),
             "", "pre = the unedited model (same for every editor). ES/NS compare mean per-token NLL "
             "(ROME); acc/exact are teacher-forced; gen is greedy generation; ppl on 4x256 tokens of held "
             "Wikipedia text (after each single edit, pooled)."]
    (out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

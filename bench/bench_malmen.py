"""MALMEN on SmolLM2-135M: batches of CounterFact edits in one shift, beside MEND's summed shifts.

    OMP_NUM_THREADS=1 python bench/bench_malmen.py --editor checkpoints/malmen-smollm2-135m-counterfact.safetensors \
        --n 100 --tag short

Each editor edits the first ``--n`` records of counterfact_dev_rome.json in one batch
(``kedit.eval.evaluate(mode="batch")``): teacher-forced ES / PS / NS, neighbour top-1
agreement and KL, perplexity, edit seconds, peak RSS. Editors: the trained MALMEN
(``--editor``) and the shipped MEND editor on the same batch (``--mend``; MEND sums the
per-edit shifts). The pre-edit scores are measured once.
Writes bench/results/malmen_batch_<n><tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from kedit import paths

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results"
KEYS = ["rewrite/es", "rewrite/exact", "paraphrase/es", "paraphrase/exact", "neighborhood/ns", "neighborhood/agree",
        "neighborhood/kl", "general/ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editor", required=True, help="trained MALMEN artifact")
    p.add_argument("--mend", default=str(ROOT / "checkpoints" / "mend-smollm2-135m-counterfact.safetensors"),
                   help="MEND artifact to compare with ('' to skip)")
    p.add_argument("--n", type=int, nargs="+", default=[100], help="records per batch (one run per n)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--note", default="", help="a line for the markdown (e.g. how long the editor was trained)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=OUT, help="folder of the result files")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    import kedit
    from kedit.checkpoint import read_artifact_meta
    from kedit.data import load_requests

    data = paths.data_dir(required=True) / "counterfact" / "counterfact_dev_rome.json"
    model, tok = kedit.load_model("smollm2-135m", device=args.device)
    trained = kedit.load_editor(args.editor, model=model)
    editors = {"malmen": trained}
    if args.mend:
        editors["mend (sum of shifts)"] = kedit.load_editor(args.mend, model=model)
    meta = read_artifact_meta(args.editor)
    for n in args.n:
        run(args, model, tok, editors, load_requests(data)[:n], meta)


def run(args, model, tok, editors, reqs, meta) -> None:
    """Evaluate each editor on one batch of ``reqs``; the files are rewritten after each editor
    (a run stopped by a deadline keeps the editors done so far)."""
    from kedit.eval import evaluate

    n, pre = len(reqs), None
    payload = {"args": {**vars(args), "n": n}, "editor_meta": {k: meta.get(k) for k in ("hparams", "extra")}}
    done = []
    for name, editor in editors.items():
        t0 = time.perf_counter()
        res = evaluate(model, tok, editor, reqs, mode="batch", generation=False, fluency=False, reuse_pre=pre,
                       progress=False)
        pre = pre or res
        payload[name] = {"results": res.to_dict(), "wall_s": time.perf_counter() - t0}
        done.append((name, res))
        write(args.out, f"malmen_batch_{n}{args.tag}", payload, to_markdown(args, n, done))


def to_markdown(args, n: int, done: list) -> str:
    md = [f"# MALMEN, one batch of {n} counterfact_dev_rome edits, SmolLM2-135M\n"]
    if args.note:
        md.append(args.note + "\n")
    md.append("| editor | " + " | ".join(KEYS) + " | edit s / request | peak RSS MB |")
    md.append("|---" * (len(KEYS) + 3) + "|")
    md.append("| pre-edit | " + " | ".join(_fmt(done[0][1].summary["pre"].get(k)) for k in KEYS) + " | - | - |")
    for name, res in done:
        md.append(f"| {name} | " + " | ".join(_fmt(res.summary["post"].get(k)) for k in KEYS)
                  + f" | {res.meta['edit_seconds_total'] / n:.3f} | {res.meta['peak_rss_mb']:.0f} |")
    md += ["", "Peak RSS is the process's peak so far (model, evaluation and the editors before), not the "
           "edit's own; one batch edit per editor, so edit s / request = the edit's seconds / n.", ""]
    md += [res.to_markdown(title=f"{name}: one batch of {n} CounterFact records, SmolLM2-135M") for name, res in done]
    return "\n".join(md)


def write(out: Path, name: str, payload: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{name}.md").write_text(md + "\n")
    print(md)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


if __name__ == "__main__":
    main()

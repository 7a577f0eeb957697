"""SERAC on SmolLM2-135M: quality, sequential retention, edit time and routing overhead.

    python bench/bench_serac.py --artifact checkpoints/serac-smollm2-135m-counterfact.safetensors \
        --parts quality sequential overhead --n-batch 200 --n-seq 1000 --out bench/results/serac

* quality: kedit.eval ``batch`` mode on the first ``--n-batch`` ``edit``-split records of
  counterfact_dev_mend.json, all stored in SERAC's memory at once (teacher-forced and
  generation-based edit / paraphrase success, neighborhood locality).
* sequential: kedit.eval ``sequential`` mode, one edit per step (an EditStack of memories),
  ``--n-seq`` records, with the retention curve.
* retention: a lighter sequential run (1,000 one-request steps) scoring a sample of 20
  stored edits at 1, 10, 100, 250, 500 and 1,000 stored edits. Its keys are its own, not the
  runner's metrics: ``sampled:rewrite/exact`` (kedit.eval's rewrite/exact on the sample),
  ``sampled:paraphrase0/exact`` (the first paraphrase only) and
  ``sampled:neighborhood0/top1_unchanged`` (every answer token's argmax on the first
  neighborhood prompt is the unedited model's: a whole-answer indicator, where the runner's
  ``neighborhood/agree`` is the fraction of tokens over all neighborhood prompts).
* overhead: wall time of one routed forward (1 query, prompt of ~10 tokens) at 1, 100 and
  1,000 stored edits, in scope and out of scope, against the base model's forward.

Writes ``<out>.json`` and ``<out>.md``. Numbers depend on the machine: the device is recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kedit import paths

ROOT = Path(__file__).resolve().parents[1]


def dev_requests(data_dir: Path, n: int, split: str = "edit"):
    from kedit.data.loaders import load_requests

    path = data_dir / "counterfact" / "counterfact_dev_mend.json"
    records = json.loads(path.read_text())
    keep = [r for r in records if split is None or r.get("mend_split") == split]
    if len(keep) < n:  # not enough of the split: fill with the other dev records
        keep += [r for r in records if r not in keep][: n - len(keep)]
    return load_requests(keep[:n], format="counterfact_mend")


def time_forward(model, batch, reps: int) -> float:
    """Median seconds of one forward."""
    times = []
    with torch.no_grad():
        for _ in range(reps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(**batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def overhead(model, tok, editor, requests, sizes=(1, 100, 1000), reps: int = 20) -> list[dict]:
    dev = next(model.parameters()).device
    rows = []
    probe_in = requests[0]
    out_text = "The Eiffel Tower is located in the city of"
    enc_in = tok([probe_in.paraphrase_prompts[0] if probe_in.paraphrase_prompts else probe_in.prompt],
                 return_tensors="pt").to(dev)
    enc_out = tok([out_text], return_tensors="pt").to(dev)
    base_in, base_out = time_forward(model, enc_in, reps), time_forward(model, enc_out, reps)
    for n in sizes:
        reqs = requests[:n]
        t = time.perf_counter()
        edit = editor.edit(model, tok, reqs)
        edit_s = time.perf_counter() - t
        with edit.applied(model):
            router = model.__dict__["_kedit_serac_router"]
            routed_in = router.route([tok.decode(enc_in["input_ids"][0])])[0]
            t_in, t_out = time_forward(model, enc_in, reps), time_forward(model, enc_out, reps)
        rows.append({"stored_edits": n, "edit_seconds_total": edit_s, "edit_seconds_per_request": edit_s / n,
                     "base_forward_ms": {"in_scope_prompt": base_in * 1e3, "out_of_scope_prompt": base_out * 1e3},
                     "routed_forward_ms": {"in_scope": t_in * 1e3, "out_of_scope": t_out * 1e3},
                     "overhead_ms": {"in_scope": (t_in - base_in) * 1e3, "out_of_scope": (t_out - base_out) * 1e3},
                     "probe_routed_to_its_edit": bool(routed_in is not None and routed_in[1] == 0)})
        logging.info("overhead at %d edits: %s", n, rows[-1])
    return rows


def retention(model, tok, editor, requests, checkpoints=(1, 10, 100, 250, 500, 1000), sample: int = 20) -> dict:
    """Sequential editing, one request per step pushed onto an applied EditStack. At each
    checkpoint k: teacher-forced exact success of ``sample`` stored edits (evenly spread over
    the first k, the very first included) on their prompt and first paraphrase, and whether
    the argmax tokens of the answer to their first neighborhood prompt are all unchanged
    (see the module's docstring for how these keys differ from the runner's metrics)."""
    from kedit.editors.base import EditStack
    from kedit.eval.metrics import token_accuracy
    from kedit.eval.scoring import score_targets

    def exact(sc) -> float:
        return float(token_accuracy(sc.correct, sc.length)[1].mean())

    def pick(k: int) -> list:
        if k <= sample:
            return requests[:k]
        idx = sorted({round(j * (k - 1) / (sample - 1)) for j in range(sample)})
        return [requests[i] for i in idx]

    def loc_rows(reqs):
        return [(r.neighborhood[0].prompt, r.neighborhood[0].answer) for r in reqs if r.neighborhood]

    pre_top1 = {}
    for k in checkpoints:
        rows = loc_rows(pick(k))
        sc = score_targets(model, tok, [p for p, _ in rows], [a for _, a in rows])
        pre_top1.update({p: t for (p, _), t in zip(rows, sc.top1)})
    stack, curve, secs = EditStack(), [], []
    try:
        for n, req in enumerate(requests[: max(checkpoints)], start=1):
            t = time.perf_counter()
            edit = editor.edit(model, tok, req, history=stack)
            if stack.is_applied:
                stack.push(edit, model)
            else:
                stack.push(edit)
                stack.apply(model)
            secs.append(time.perf_counter() - t)
            if n in checkpoints:
                reqs = pick(n)
                rw = score_targets(model, tok, [r.prompt for r in reqs], [r.target_new for r in reqs])
                para = [(r.paraphrase_prompts[0], r.target_new) for r in reqs if r.paraphrase_prompts]
                pp = score_targets(model, tok, [p for p, _ in para], [a for _, a in para])
                rows = loc_rows(reqs)
                lc = score_targets(model, tok, [p for p, _ in rows], [a for _, a in rows])
                agree = [float(torch.equal(t, pre_top1[p])) for (p, _), t in zip(rows, lc.top1)]
                point = {"n_edits": n, "sampled": len(reqs),
                         "sampled:rewrite/exact": exact(rw), "sampled:paraphrase0/exact": exact(pp),
                         "sampled:neighborhood0/top1_unchanged": sum(agree) / max(1, len(agree)),
                         "edit_seconds_mean_so_far": sum(secs) / len(secs)}
                curve.append(point)
                logging.info("retention: %s", point)
    finally:
        stack.restore(model)
    return {"curve": curve, "edit_seconds_mean": sum(secs) / len(secs), "edit_seconds_max": max(secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=str(ROOT / "checkpoints" / "serac-smollm2-135m-counterfact.safetensors"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="the development data (default: $KEDIT_DATA)")
    ap.add_argument("--parts", nargs="+", default=["quality", "retention", "overhead"],
                    help="quality (kedit.eval batch mode), sequential (kedit.eval sequential mode: heavy), "
                         "retention (light sequential curve), overhead")
    ap.add_argument("--n-batch", type=int, default=200)
    ap.add_argument("--n-seq", type=int, default=1000)
    ap.add_argument("--curve-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serac"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import kedit
    from kedit.eval import EvalConfig, evaluate

    model, tok = kedit.load_model(args.model, device=args.device)
    t = time.perf_counter()
    editor = kedit.load_editor(args.artifact, model)
    load_s = time.perf_counter() - t
    data_dir = Path(args.data_dir) if args.data_dir else paths.data_dir(required=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    out: dict = {"artifact": args.artifact, "artifact_mb": Path(args.artifact).stat().st_size / 2**20,
                 "model": args.model, "device": args.device, "device_name": device_name,
                 "threads": args.threads, "editor_load_seconds": load_s, "hparams": vars(editor.hparams)}
    md = [f"# SERAC on {args.model} ({device_name}, {args.threads} CPU threads)", "",
          f"artifact: `{args.artifact}` ({out['artifact_mb']:.1f} MB), loaded in {load_s:.1f} s", ""]
    cfg = EvalConfig(batch_size=32, fluency=False, ppl_docs=4)
    if "quality" in args.parts:
        reqs = dev_requests(data_dir, args.n_batch)
        res = evaluate(model, tok, editor, reqs, mode="batch", config=cfg)
        out["quality"] = {"summary": res.summary, "meta": {k: v for k, v in res.meta.items() if k not in ("edit_seconds", "edit_cpu_seconds")}}
        res.to_json(f"{args.out}-quality-full.json")
        md += [res.to_markdown(f"All {len(reqs)} edit-split CounterFact dev edits stored at once (batch mode)"), ""]
    if "sequential" in args.parts:
        reqs = dev_requests(data_dir, args.n_seq, split=None)
        res = evaluate(model, tok, editor, reqs, mode="sequential", batch_size=1,
                       config=EvalConfig(batch_size=32, fluency=False, ppl_docs=2, curve_every=args.curve_every,
                                         curve_generation=False))
        out["sequential"] = {"summary": res.summary, "curve": res.curves,
                             "meta": {k: v for k, v in res.meta.items() if k not in ("edit_seconds", "edit_cpu_seconds")}}
        md += [res.to_markdown(f"Sequential editing: {len(reqs)} edits, one per step"), "",
               "| edits stored | seen: rewrite/es | seen: rewrite/acc | first edits: rewrite/es | ppl |",
               "|---|---|---|---|---|"]
        for p in res.curves:
            first = [k for k in p if k.startswith("first") and k.endswith("rewrite/es")]
            md.append(f"| {p['n_edits']} | {p.get('seen:rewrite/es', float('nan')):.3f} | "
                      f"{p.get('seen:rewrite/acc', float('nan')):.3f} | "
                      f"{p[first[0]] if first else float('nan'):.3f} | {p['general/ppl']:.2f} |")
        md.append("")
    if "retention" in args.parts:
        reqs = dev_requests(data_dir, args.n_seq, split=None)
        ret = retention(model, tok, editor, reqs, checkpoints=tuple(c for c in (1, 10, 100, 250, 500, 1000, 2000)
                                                                     if c <= args.n_seq))
        out["retention"] = ret
        md += [f"Sequential editing (one edit per step, EditStack of SERAC memories; "
               f"{ret['edit_seconds_mean']:.4f} s per edit, max {ret['edit_seconds_max']:.3f} s). "
               "Scores on 20 sampled stored edits (evenly over all edits so far, the first included):", "",
               "| edits stored | rewrite exact | first paraphrase exact | first neighbour's answer: top-1 unchanged |",
               "|---|---|---|---|"]
        for p in ret["curve"]:
            md.append(f"| {p['n_edits']} | {p['sampled:rewrite/exact']:.3f} | {p['sampled:paraphrase0/exact']:.3f} | "
                      f"{p['sampled:neighborhood0/top1_unchanged']:.3f} |")
        md.append("")
    if "overhead" in args.parts:
        reqs = dev_requests(data_dir, 1000, split=None)
        rows = overhead(model, tok, editor, reqs)
        out["overhead"] = rows
        md += ["| stored edits | edit s/request | base fwd ms (in/out) | routed fwd ms in scope | "
               "routed fwd ms out of scope | probe routed to its edit |", "|---|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['stored_edits']} | {r['edit_seconds_per_request']:.4f} | "
                      f"{r['base_forward_ms']['in_scope_prompt']:.1f} / {r['base_forward_ms']['out_of_scope_prompt']:.1f} | "
                      f"{r['routed_forward_ms']['in_scope']:.1f} | {r['routed_forward_ms']['out_of_scope']:.1f} | "
                      f"{r['probe_routed_to_its_edit']} |")
        md.append("")
    suffix = "-" + "-".join(args.parts)
    Path(f"{args.out}{suffix}.json").write_text(json.dumps(out, indent=1, default=str))
    Path(f"{args.out}{suffix}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())

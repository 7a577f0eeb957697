"""WISE's router on SmolLM2 (issue 18): after N sequential zsRE edits, where do its scores fall?

    export KEDIT_DATA=/work/shared/data OMP_NUM_THREADS=1
    python bench/wise_routing.py --n 20 --name wise_routing_20 --runs \\
        'paper margins, lr 1={"max_score_tokens": 100}' 'lr 0.3={"lr": 0.3, "max_score_tokens": 100}' \\
        'gamma 30={"gamma": 30, "max_score_tokens": 100}' \\
        'x_i from NQ={"irrelevant_corpus": "nq", "max_score_tokens": 100}'

For each run (``NAME=JSON`` of hyperparameter overrides on ``configs/wise/llama.yaml``): make ``--n``
WISE edits one at a time on the first valid ``zsre:dev`` records (as ``bench_lifelong.py``), apply
them, then read the router's score (the largest Δ over the side memories, as it routes) on:

* ``rewrite``: each edit's prompt and new target; ``paraphrase``: its first paraphrase and target;
* ``nq``: each record's first NQ locality question and answer (must stay on the main memory);
* ``held``: the 4 held documents of the perplexity metric, cut to 256 tokens, scored by the
  router's rule for long inputs (the max over tokens past ``max_score_tokens``) and by the mean.

and the share of each routed to the side memory at thresholds ``act_ratio · ε`` for act_ratio .88
(EasyEdit), 1.0, 1.1 and 1.2 (ε: the least in-scope score of the edits). ``"irrelevant_corpus":
"nq"`` takes the routing loss's irrelevant texts x_i from the NQ questions of the last 200 valid
``zsre:train`` records (EasyEdit's choice; a 1,000-edit stream uses the first 461). Writes
``<name>.md`` and ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RATIOS = (0.88, 1.0, 1.1, 1.2)
log = logging.getLogger("wise_routing")


def nq_texts(n: int = 200) -> list[str]:
    from kedit.data.loaders import load_requests

    tail = load_requests("zsre:train", on_error="skip")[-n:]
    return [f"{p.prompt} {p.answer}" for r in tail for p in r.neighborhood[:1]]


def run(model, tok, reqs: list, overrides: dict) -> dict:
    import kedit
    from kedit import paths
    from kedit.eval import EvalConfig
    from kedit.eval.scoring import load_texts

    if overrides.get("irrelevant_corpus") == "nq":
        overrides = {**overrides, "irrelevant_corpus": nq_texts()}
    editor = kedit.editor("wise", config="auto", model=model, **overrides)
    history, t0, c0 = [], time.perf_counter(), time.process_time()
    for r in reqs:
        edit = editor.edit(model, tok, [r], history=history)
        edit.apply(model)
        history.append(edit)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    router = history[-1]._router
    eps, rule = router.memory.epsilon, history[-1].max_score_tokens
    seen: list[float] = []
    mode = {"max_tokens": rule}

    def record(module, args, out):  # the router's own score, computed before it routes
        _sides, scores = router.scores(module, args[0], out, mode["max_tokens"])
        seen.extend(scores.max(0).values.tolist())

    def scores(texts: list[str]) -> list[float]:
        seen.clear()
        with torch.no_grad():
            for t in texts:
                model(**tok(t, return_tensors="pt"))
        return list(seen)

    cfg = EvalConfig()  # the perplexity metric's held documents and cut
    held = [tok.decode(tok(t)["input_ids"][:cfg.ppl_tokens])
            for t in load_texts(paths.held_text(cfg.ppl_path), cfg.ppl_docs)]
    cats = {"rewrite": [f"{r.prompt} {r.target_new}" for r in reqs],
            "paraphrase": [f"{p} {r.target_new}" for r in reqs for p in r.paraphrase_prompts[:1]],
            "nq": [f"{p.prompt} {p.answer}" for r in reqs for p in r.neighborhood[:1]],
            "held": held}
    handle = router.module.register_forward_hook(record, prepend=True)
    try:
        out = {k: scores(v) for k, v in cats.items()}
        mode["max_tokens"] = None
        out["held (mean)"] = scores(held)
    finally:
        handle.remove()
    for e in reversed(history):
        e.restore(model)
    return {"epsilon": eps, "max_score_tokens": rule, "edit_wall_s": wall, "edit_cpu_s": cpu,
            "steps": [e.info["steps"] for e in history], "loss": [e.info["loss"] for e in history],
            "scores": out}


def table(results: dict[str, dict], n: int) -> str:
    lines = [f"### WISE's router after {n} sequential zsRE edits, SmolLM2-135M",
             "", "Share routed to the side memory at act_ratio " + " / ".join(f"{r:g}" for r in RATIOS)
             + " (threshold act_ratio · ε), and the scores' quartiles (min, 25%, median, 75%, max).", "",
             "| run | ε | final loss (median) | input | n | routed | scores |",
             "| --- | ---: | ---: | --- | ---: | --- | --- |"]
    for name, res in results.items():
        eps = res["epsilon"]
        loss = sorted(res["loss"])[len(res["loss"]) // 2]
        for cat, s in res["scores"].items():
            t = torch.tensor(s)
            routed = " / ".join(f"{float((t > r * eps).float().mean()):.2f}" for r in RATIOS)
            q = torch.quantile(t, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
            lines.append(f"| {name} | {eps:.1f} | {loss:.2f} | {cat} | {len(s)} | {routed} | "
                         + ", ".join(f"{float(x):.1f}" for x in q) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    sys.path.insert(0, str(HERE))
    import kedit
    from bench_lifelong import load_stream

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="NAME=JSON of WISE hyperparameter overrides")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--name", default=None)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    runs = dict(r.split("=", 1) for r in args.runs)
    model, tok = kedit.load_model("smollm2-135m")
    reqs, _ = load_stream(args.n, ("zsre:dev",))
    name = args.name or f"wise_routing_{args.n}"
    results = {}
    for label, hp in runs.items():
        log.info("%s: %s", label, hp)
        results[label] = {"overrides": json.loads(hp), **run(model, tok, reqs, json.loads(hp))}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps({"n": args.n, "runs": results}, indent=1))
        (args.out / f"{name}.md").write_text(table(results, args.n))
        log.info("%s: ε %.2f, edits %.0f s wall / %.0f s CPU", label, results[label]["epsilon"],
                 results[label]["edit_wall_s"], results[label]["edit_cpu_s"])


if __name__ == "__main__":
    main()

"""MEMIT and AlphaEdit on SmolLM2-135M (CounterFact): batch edits and sequential editing.

    OMP_NUM_THREADS=1 python bench/bench_memit.py --part batch --n 100
    OMP_NUM_THREADS=1 python bench/bench_memit.py --part batch --n 500
    OMP_NUM_THREADS=1 python bench/bench_memit.py --part sequential --n 500 --step 50

Writes JSON + markdown to bench/results/memit_<part>_<n>.{json,md}. ``sequential`` runs MEMIT
and AlphaEdit on the same records and gives the retention and perplexity curves of both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("KEDIT_DATA", HERE.parents[1] / "shared" / "data"))
CF = DATA / "counterfact" / "counterfact_dev_rome.json"
OUT = HERE / "results"


def write(name: str, payload: dict, md: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    (OUT / f"{name}.md").write_text(md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["batch", "sequential"], default="batch")
    p.add_argument("--n", type=int, default=100, help="CounterFact records")
    p.add_argument("--step", type=int, default=50, help="requests per edit in sequential mode")
    p.add_argument("--editors", nargs="+", default=None, help="default: memit (batch), memit alphaedit (sequential)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gen-prompts", type=int, default=1, help="generation prompts per record for fluency")
    p.add_argument("--fluency-tokens", type=int, default=32)
    p.add_argument("--hparams", default="{}", help="JSON of hyperparameter overrides for every editor")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    import kedit
    from kedit.data import load_requests
    from kedit.eval import evaluate

    model, tok = kedit.load_model("smollm2-135m")
    reqs = load_requests(CF)[: args.n]
    names = args.editors or (["memit"] if args.part == "batch" else ["memit", "alphaedit"])
    payload, md = {"args": vars(args)}, []
    pre = None
    for name in names:
        editor = kedit.editor(name, corpus=str(DATA / "corpus"), stats_tokens=args.stats_tokens,
                              **json.loads(args.hparams))
        t0 = time.perf_counter()
        editor.second_moments(model, tok, editor.layers(model))
        stats_s = time.perf_counter() - t0
        common = dict(generation=args.generation, fluency=args.generation, max_generation_prompts=args.gen_prompts,
                      fluency_new_tokens=args.fluency_tokens, reuse_pre=pre)
        if args.part == "batch":
            res = evaluate(model, tok, editor, reqs, mode="batch", **common)
            title = f"{name}: one batch of {len(reqs)} CounterFact records, SmolLM2-135M"
        else:
            tag = f"memit_{args.part}_{args.n}" + (f"_{'_'.join(names)}" if args.editors else "")
            partial = OUT / f"{tag}.{name}.partial.json"

            def save_point(point: dict, _curve: list = [], _path: Path = partial) -> None:
                _curve.append(point)  # a long run killed by a deadline keeps its curve so far
                OUT.mkdir(parents=True, exist_ok=True)
                _path.write_text(json.dumps({"args": vars(args), "curve": _curve}, indent=1, default=str))

            res = evaluate(model, tok, editor, reqs, mode="sequential", batch_size=args.step, on_curve=save_point,
                           **common)
            title = f"{name}: sequential, {len(reqs)} records in batches of {args.step}, SmolLM2-135M"
        pre = res
        payload[name] = {"results": res.to_dict(), "stats_seconds": stats_s}
        md.append(res.to_markdown(title=title))
        md.append(f"statistics: {args.stats_tokens} tokens, layers {editor.layers(model)}, {stats_s:.1f} s "
                  f"(0 when cached); threads: {args.threads}\n")
    write(f"memit_{args.part}_{args.n}" + (f"_{'_'.join(names)}" if args.editors else ""), payload, "\n".join(md))


if __name__ == "__main__":
    main()

"""MEMIT and AlphaEdit on SmolLM2-135M (CounterFact): batch edits and sequential editing.

    OMP_NUM_THREADS=1 python bench/bench_memit.py --part batch --n 100 500
    OMP_NUM_THREADS=1 python bench/bench_memit.py --part sequential --n 500 --step 50

Writes JSON + markdown to bench/results/memit_<part>_<n>.{json,md}. ``batch`` edits the
unedited model with one batch of the first n records, for each n; the runs share each
request's value (bench/value_cache.py: a value does not depend on the rest of its batch).
``sequential`` runs MEMIT and AlphaEdit on the same records and gives the retention and
perplexity curves of both.

With ``--values-dir``, batch runs keep the values on disk, and a second process on the other
core can optimize the same run's values from the far end of MEMIT's order:

    OMP_NUM_THREADS=1 python bench/bench_memit.py --part batch --n 100 500 --values-dir /tmp/v &
    OMP_NUM_THREADS=1 python bench/bench_memit.py --part values --n 500 --values-dir /tmp/v
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
DATA = paths.data_dir(required=True)  # the development data: $KEDIT_DATA (kedit.paths)
CF = DATA / "counterfact" / "counterfact_dev_rome.json"
OUT = HERE / "results"


def write(name: str, payload: dict, md: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    (OUT / f"{name}.md").write_text(md)
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["batch", "sequential", "values"], default="batch")
    p.add_argument("--n", type=int, nargs="+", default=[100], help="CounterFact records (batch: one run per n)")
    p.add_argument("--step", type=int, default=50, help="requests per edit in sequential mode")
    p.add_argument("--editors", nargs="+", default=None, help="default: memit (batch), memit alphaedit (sequential)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gen-prompts", type=int, default=1, help="generation prompts per record for fluency")
    p.add_argument("--fluency-tokens", type=int, default=32)
    p.add_argument("--hparams", default="{}", help="JSON of hyperparameter overrides for every editor")
    p.add_argument("--values-dir", default=None, help="batch/values: share optimized values through this folder")
    p.add_argument("--tag", default="", help="suffix of the result files (for runs with other --hparams)")
    p.add_argument("--reuse-pre", default=None,
                   help="result JSON of an earlier run on the same records and evaluation settings: take its "
                        "pre-edit scores instead of measuring them again")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    import kedit
    from kedit.data import load_requests
    from value_cache import shared_values

    model, tok = kedit.load_model("smollm2-135m")
    if args.part == "sequential":
        for n in args.n:
            run(args, model, tok, load_requests(CF)[:n])
    elif args.part == "values":
        with shared_values(args.values_dir) as cache:
            prefill(args, model, tok, load_requests(CF)[:max(args.n)], cache)
    else:
        with shared_values(args.values_dir) as cache:
            for n in args.n:
                run(args, model, tok, load_requests(CF)[:n], cache)
                logging.info("values cached for %d requests", len(cache))


def prefill(args, model, tok, reqs, cache) -> None:
    """Optimize the values of a ``--part batch`` run in MEMIT's batches, last batch first;
    the caching wrapper skips those the batch run (or an earlier prefill) has done."""
    import kedit.editors.memit as memit_mod
    from kedit.editors.locate import context_templates, locate_requests
    from kedit.models.arch import arch_of

    editor = cache.editor("memit", corpus=str(DATA / "corpus"), stats_tokens=args.stats_tokens,
                          **json.loads(args.hparams))
    hp, reqs = editor.hparams, locate_requests(reqs)
    templates = context_templates(model, tok, hp.templates, hp.template_seed)
    module = arch_of(model).block(editor.layers(model)[-1])
    batches = memit_mod.value_batches(tok, reqs, hp.v_batch_size)
    for k, idx in reversed(list(enumerate(batches))):
        editor.values(model, tok, [reqs[i] for i in idx], templates, module)
        logging.info("values of batch %d/%d ready", k + 1, len(batches))


def run(args, model, tok, reqs, cache=None) -> None:
    import kedit
    from kedit.eval import evaluate

    n = len(reqs)
    names = args.editors or (["memit"] if args.part == "batch" else ["memit", "alphaedit"])
    tag = f"memit_{args.part}_{n}" + (f"_{'_'.join(names)}" if args.editors else "") + args.tag
    payload, md = {"args": {**vars(args), "n": n}}, []
    from reuse import reused_pre

    pre = reused_pre(args.reuse_pre, n)
    for name in names:
        make = kedit.editor if cache is None else cache.editor  # batch: values shared across runs
        editor = make(name, corpus=str(DATA / "corpus"), stats_tokens=args.stats_tokens, **json.loads(args.hparams))
        t0 = time.perf_counter()
        editor.second_moments(model, tok, editor.layers(model))
        stats_s = time.perf_counter() - t0
        common = dict(generation=args.generation, fluency=args.generation, max_generation_prompts=args.gen_prompts,
                      fluency_new_tokens=args.fluency_tokens, reuse_pre=pre)
        if args.part == "batch":
            res = evaluate(model, tok, editor, reqs, mode="batch", **common)
            title = f"{name}: one batch of {n} CounterFact records, SmolLM2-135M"
        else:
            partial, curve = OUT / f"{tag}.{name}.partial.json", []

            def save_point(point: dict) -> None:
                curve.append(point)  # a long run killed by a deadline keeps its curve so far
                OUT.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"args": payload["args"], "curve": curve}, indent=1, default=str))

            res = evaluate(model, tok, editor, reqs, mode="sequential", batch_size=args.step, on_curve=save_point,
                           **common)
            title = f"{name}: sequential, {n} records in batches of {args.step}, SmolLM2-135M"
        pre = res
        payload[name] = {"results": res.to_dict(), "stats_seconds": stats_s}
        md.append(res.to_markdown(title=title))
        md.append(f"statistics: {args.stats_tokens} tokens, layers {editor.layers(model)}, {stats_s:.1f} s "
                  f"(0 when cached); threads: {args.threads}\n")
    write(tag, payload, "\n".join(md))


if __name__ == "__main__":
    main()

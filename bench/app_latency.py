"""Latency of the live editing app's steps on the default model (for the README / issue 14).

    python bench/app_latency.py [--threads 2]

Measures, through kedit.app.core.Workbench (what the page calls): loading the model, the
one-time ROME statistics (measured into a temporary folder, so they are paid here), a ROME
edit with the tuned config and cached statistics (the edit alone, and everything the page
waits for: before answers, edit, after answers), undo, restore all, and the evaluation.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

log = logging.getLogger("bench.app_latency")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    import kedit
    from kedit.app.core import Workbench

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []

    def timed(what, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append((what, time.perf_counter() - t0))
        log.info("%s: %.1f s", what, rows[-1][1])
        return out

    model, tok = timed("load the model (cached)", lambda: kedit.load_model(args.model))
    wb = timed("start the workbench (fingerprint, sha256)", lambda: Workbench(model, tok, args.model))
    fact = wb.request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "",
                      "The Eiffel Tower is in", "The Louvre is located in the city of\nThe capital of France is")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = wb.hparams_text("rome").replace("stats_cache_dir: null", f"stats_cache_dir: {tmp}")
        _, seconds = timed("first edit, statistics not cached (page total)", lambda: wb.apply("rome", fresh, fact))
        rows.append(("  of which the edit (statistics included)", seconds))
    timed("undo", wb.undo)
    # another fact, so that no answer is memoised: what a new fact costs
    other = wb.request("The Colosseum is located in the city of", "Colosseum", "London", "",
                       "The Colosseum is in", "The Vatican is located in the city of\nThe capital of Italy is")
    _, seconds = timed("ROME edit, statistics cached (page total: answers before, edit, answers after)",
                       lambda: wb.apply("rome", wb.hparams_text("rome").replace(f"stats_cache_dir: {tmp}",
                                                                               "stats_cache_dir: null"), other))
    rows.append(("  of which the edit", seconds))
    timed("evaluation of the applied edit (single mode)", lambda: wb.evaluate(progress=False))
    timed("restore all (fingerprint + sha256 check)", wb.restore_all)
    print(f"\n| step ({torch.get_num_threads()} torch threads) | seconds |\n|---|---:|")
    for what, s in rows:
        print(f"| {what} | {s:.1f} |")


if __name__ == "__main__":
    main()

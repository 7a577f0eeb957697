"""Wall time of loading the offline models: first (uncached) load and cache hits.

    python bench/load_times.py [--models smollm2-135m gemma3-270m] [--threads 1] [--repeats 2] [--no-uncached]

Each load runs in a fresh Python process (nothing warm in memory; the OS file cache may
be). "uncached" dequantizes the GGUF into a cache folder: into the real cache
($KEDIT_CACHE or ~/.cache/kedit) when it does not hold the model yet, otherwise into a
temporary folder that is deleted afterwards. "cache hit" reads the safetensors folder.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from kedit.models import load_model
t1 = time.perf_counter()
model, tok = load_model({model!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1}}))
"""


def timed_load(model: str, threads: int, cache: str | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    if cache is not None:
        env["KEDIT_CACHE"] = cache
    out = subprocess.run([sys.executable, "-c", CHILD.format(model=model, threads=threads)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="cache-hit loads per model")
    parser.add_argument("--no-uncached", action="store_true",
                        help="only cache hits (the model must be cached already)")
    args = parser.parse_args()

    from kedit.models.loading import cache_dir

    rows = []
    for model in args.models:
        cached = (cache_dir() / "models" / model / "model.safetensors").is_file()
        first = None
        if not (args.no_uncached and cached):
            tmp = tempfile.mkdtemp(prefix="kedit-bench-") if cached else None
            try:
                first = timed_load(model, args.threads, tmp)
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
        hits = [timed_load(model, args.threads, None) for _ in range(args.repeats)]
        rows.append((model, first, hits))

    print(f"threads={args.threads}")
    print("| model | uncached load (s) | cache-hit load (s) | import kedit+torch (s) |")
    print("|---|---|---|---|")
    for model, first, hits in rows:
        hit = " / ".join(f"{h['load_s']:.1f}" for h in hits)
        uncached = f"{first['load_s']:.1f}" if first else "-"
        print(f"| {model} | {uncached} | {hit} | {hits[-1]['import_s']:.1f} |")


if __name__ == "__main__":
    main()

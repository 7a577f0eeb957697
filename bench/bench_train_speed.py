"""Training speed of the learned editors (issue 17 §4): seconds per optimizer step and edits per
second of ``python -m kedit.train`` for MEND and MALMEN on this CPU, and where one step's time goes.

    KEDIT_DATA=../shared/data python bench/bench_train_speed.py --runs mend:1 mend:4 malmen:16 --threads 1 2
    KEDIT_DATA=... python bench/bench_train_speed.py --trainer trainers/gpu.yaml --threads 8 --tag _gpu

Each run is ``python -m kedit.train fit`` in its own process (``OMP_NUM_THREADS`` = the thread
count) with the shipped SmolLM2 preset (``configs/<editor>/smollm2-counterfact.yaml``, the trainer
preset ``--trainer``, ``trainers/cpu.yaml`` by default), the batch size given after the colon, no
logger, no checkpoint and no validation. ``StepTimer`` times every training step (the first
``--warmup`` left out; on a GPU it synchronizes first) and profiles the last one with
``torch.profiler``. Writes ``bench/results/train_speed{--tag}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results"


class StepTimer(pl.Callback):
    """Wall time of every training step; the last step under ``torch.profiler``; written to ``out``."""

    def __init__(self, out: str, profile: bool = True):
        self.out, self.profile = out, profile
        self.times: list[float] = []
        self._t0 = 0.0
        self._prof = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.profile and trainer.global_step == trainer.max_steps - 1:
            import torch.profiler

            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._t0)

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        table = None
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            cuda = pl_module.device.type == "cuda"
            table = self._prof.key_averages().table(
                sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12)
        peak_gpu = None
        if pl_module.device.type == "cuda":
            import torch

            peak_gpu = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        Path(self.out).write_text(json.dumps({
            "times": self.times, "trainable": self.trainable, "profile": table, "peak_gpu_mb": peak_gpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(editor: str, batch: int, threads: int, steps: int, trainer: str = "trainers/cpu.yaml") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timer.json"
        callbacks = json.dumps([{"class_path": "bench_train_speed.StepTimer", "init_args": {"out": str(out)}}])
        cmd = [sys.executable, "-m", "kedit.train", "fit",
               "--config", str(ROOT / "configs" / editor / "smollm2-counterfact.yaml"),
               "--trainer", str(ROOT / trainer),
               "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
               f"--trainer.callbacks={callbacks}", "--trainer.limit_val_batches", "0",
               "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
               "--data.init_args.batch_size", str(batch)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{editor} batch {batch}, {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
        return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["mend:1", "mend:4", "malmen:16"], help="EDITOR:BATCH")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the last one profiled)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--trainer", default="trainers/cpu.yaml", help="trainer preset (trainers/gpu.yaml, ddp.yaml, ...)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    rows = []
    for spec in args.runs:
        editor, batch = spec.split(":")
        for threads in args.threads:
            res = run(editor, int(batch), threads, args.steps, args.trainer)
            timed = res["times"][args.warmup:-1]  # the last step ran under the profiler
            mean = statistics.mean(timed)
            rows.append({"editor": editor, "batch": int(batch), "threads": threads, "steps_timed": len(timed),
                         "s_per_step": mean, "median_s": statistics.median(timed),
                         "edits_per_s": int(batch) / mean, "trainable": res["trainable"],
                         "peak_rss_mb": res["peak_rss_mb"], "peak_gpu_mb": res.get("peak_gpu_mb"),
                         "wall_s": res["wall_s"], "profile": res["profile"],
                         "times": res["times"]})
            print(f"{editor} batch {batch}, {threads} thread(s): {mean:.2f} s/step", flush=True)
    header = ("| editor | edits per step | threads | s per step (mean) | median | edits per s | steps per s | "
              "trainable params | peak RSS MB | peak GPU MB |")
    preset = os.path.relpath(ROOT / args.trainer, ROOT)  # as given, or relative when an absolute path
    title = f"### Training speed of the learned editors, SmolLM2-135M, `{preset}` (`python -m kedit.train`, shipped presets)"
    md = [title, "", header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-"
        md.append(f"| {r['editor']} | {r['batch']} | {r['threads']} | {r['s_per_step']:.3f} | {r['median_s']:.3f} | "
                  f"{r['edits_per_s']:.2f} | {1 / r['s_per_step']:.3f} | {r['trainable'] / 1e6:.1f}M | "
                  f"{r['peak_rss_mb']:.0f} | {gpu} |")
    md += ["", f"{args.steps} steps per run, the first {args.warmup} and the last (profiled) left out of the mean.",
           "Peer trainer's MEND: 0.87 s per step at batch 1 on 2 threads, 32.5M trainable parameters, 2.1 GB.", ""]
    for r in rows:
        if r["profile"]:
            title = (f"#### One step of {r['editor']}, batch {r['batch']}, {r['threads']} thread(s): "
                     f"top operators by self {'CUDA' if r.get('peak_gpu_mb') is not None else 'CPU'} time")
            md += [title, "", "```", r["profile"].strip(), "```", ""]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"train_speed{args.tag}.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    (OUT / f"train_speed{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

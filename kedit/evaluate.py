"""``python -m kedit.evaluate``: edit a model with any editor and evaluate it honestly.

    python -m kedit.evaluate --model smollm2-135m --editor rome --config auto \\
        --data counterfact-sample --mode single --limit 10

Prints a markdown table of pre- and post-edit scores, writes every number to a JSON file
(``--out``), and optionally logs to W&B (``--wandb``) and plots the sequential curves (``--plot``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("kedit.evaluate")


class UsageError(Exception):
    """A command line that cannot run (e.g. an untrained MEND, an unwritable --out)."""

EPILOG = """\
--editor is a registry name (ft-l, ft-m, lora, rome, memit, alphaedit, mend, serac) or the path
of a trained editor checkpoint (loaded with kedit.load_editor). Hyperparameters come from
--config (YAML of the editor's Hparams fields) and --hparams key=value overrides, parsed with
the field types (e.g. --hparams layers=[5] lr=1e-4 num_steps=10).

Metric keys are split/name: rewrite/* (efficacy, the edit prompt), paraphrase/* (generalization),
neighborhood/* (specificity/locality), portability/*, fluency/ngram_entropy, general/ppl.
*/es and */ns compare mean per-token probabilities (ROME), */acc and */exact are teacher-forced,
*/gen is greedy generation-based success. Pre-edit scores are always shown next to post-edit ones.

--data is a dataset name or a file. counterfact-sample (48 CounterFact records) ships with kedit;
counterfact, zsre, knowedit-zsre and mquake come from $KEDIT_DATA (the development data's layout)
or the Hugging Face hub (cached in $KEDIT_CACHE/datasets).

examples:
  python -m kedit.evaluate --editor ft-m --config auto --data counterfact-sample --limit 20
  KEDIT_DATA=/path/to/data python -m kedit.evaluate --editor memit --config auto --mode sequential \\
      --batch-size 50 --limit 500 --plot --data counterfact:dev
  python -m kedit.evaluate --editor checkpoints/mend-smollm2-135m-counterfact.safetensors --data zsre:dev --skip-bad
"""


def build_parser() -> argparse.ArgumentParser:
    from kedit.data.loaders import FORMATS
    from kedit.eval.runner import MODES

    p = argparse.ArgumentParser(prog="python -m kedit.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to edit")
    g.add_argument("--model", default="smollm2-135m",
                   help="offline model name, local HF folder, .gguf file or hub id (default: %(default)s)")
    g.add_argument("--editor", required=True, help="registry name or path to a trained editor checkpoint")
    g.add_argument("--config", help="the editor's hyperparameters: a YAML file, a shipped config's name "
                                    "(llama), or 'auto': the values tuned for --model that ship with kedit "
                                    "(default: the dataclass defaults, the papers' values)")
    g.add_argument("--hparams", nargs="*", default=[], metavar="KEY=VALUE",
                   help="hyperparameter overrides, parsed with the field types")
    g.add_argument("--data", required=True,
                   help="edit requests: a dataset name (counterfact-sample: 48 records shipped with kedit; "
                        "counterfact[:dev|train], zsre[:dev|train], knowedit-zsre, mquake: from $KEDIT_DATA or "
                        "the hub) or a JSON / JSONL file (CounterFact, zsRE, KnowEdit, ...)")
    g.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="data format (default: detected from the records)")
    g.add_argument("--limit", type=int, help="use the first N requests")
    g.add_argument("--skip-bad", action="store_true", help="skip invalid records (reported) instead of failing")

    g = p.add_argument_group("how to edit")
    g.add_argument("--mode", choices=MODES, default="single",
                   help="single: edit/evaluate/restore each request; batch: chunks as one edit; "
                        "sequential: edits stacked one after another (default: %(default)s)")
    g.add_argument("--batch-size", type=int,
                   help="requests per edit (batch: default all; sequential: default 1; single: 1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                   help="model dtype (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    g = p.add_argument_group("what to measure")
    g.add_argument("--eval-batch-size", type=int, default=32, help="prompts per forward/generate batch")
    g.add_argument("--no-generation", action="store_true", help="skip generation-based success")
    g.add_argument("--no-fluency", action="store_true", help="skip n-gram entropy of generations")
    g.add_argument("--fluency-tokens", type=int, default=64, help="tokens generated per generation prompt")
    g.add_argument("--generation-prompts", type=int, help="at most this many distinct generation prompts per request")
    g.add_argument("--no-perplexity", action="store_true", help="skip perplexity on held text")
    g.add_argument("--ppl-path", help="held text for perplexity (JSONL with 'text', or plain text); "
                                      "default: the Wikipedia sample shipped with kedit")
    g.add_argument("--ppl-docs", type=int, default=4, help="documents of held text (default: %(default)s)")
    g.add_argument("--ppl-tokens", type=int, default=256, help="tokens per document (default: %(default)s)")
    g.add_argument("--curve-every", type=int, default=0,
                   help="sequential: measure the retention/perplexity curve every N edits (default: ~10 points)")

    g = p.add_argument_group("outputs")
    g.add_argument("--out", help="JSON results file (default: outputs/eval/<editor>-<mode>-<time>.json)")
    g.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="plot the sequential curves to PNG (default path: next to --out)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline when no API key)")
    g.add_argument("--wandb-project", default="kedit", help="W&B project (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def parse_overrides(cls: type, items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "layers=[5]"]`` -> typed values of ``cls``'s dataclass fields."""
    if not items:
        return {}
    from jsonargparse import ArgumentParser

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--hparams: expected KEY=VALUE, got {item!r}")
        if key not in names:
            raise SystemExit(f"--hparams: {cls.__name__} has no field {key!r}; fields: {', '.join(sorted(names))}")
        pairs.append((key, value))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    try:
        ns = parser.parse_args([f"--{k}={v}" for k, v in pairs])
    except Exception as err:
        raise SystemExit(f"--hparams: {err}") from None
    return {k: ns[k] for k, _ in pairs}


TRAINED_ONLY = {
    "mend": "MEND edits through a trained hypernetwork, and a registry name gives an untrained one; pass "
            "the path of a trained checkpoint (e.g. checkpoints/mend-smollm2-135m-counterfact.safetensors) or "
            "train one with python -m kedit.train fit --config configs/mend/smollm2-counterfact.yaml",
}
"""Registry editors that are meaningless without training: evaluated only from a checkpoint."""


def refuse_untrained(spec: str) -> None:
    """UsageError for a registry name of an editor that needs training (see TRAINED_ONLY)."""
    if spec.lower() in TRAINED_ONLY and not Path(spec).exists():
        raise UsageError(f"--editor {spec}: {TRAINED_ONLY[spec.lower()]}")


def make_editor(spec: str, config: str | None, overrides: list[str], model):
    """A registry editor (with config/overrides), or a trained one from a checkpoint path."""
    import kedit
    from kedit.editors.base import EDITORS, editor_class

    path = Path(spec)
    if spec.lower() not in EDITORS and path.exists():
        if config or overrides:
            raise SystemExit("--config/--hparams do not apply to a trained editor checkpoint")
        return kedit.load_editor(path, model)
    if spec.lower() not in EDITORS:
        raise SystemExit(f"--editor {spec!r}: neither a registered editor ({', '.join(sorted(EDITORS))}) "
                         f"nor an existing checkpoint path")
    refuse_untrained(spec)
    cls = editor_class(spec)
    return kedit.editor(spec, config=config, model=model, **parse_overrides(cls.Hparams, overrides))


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def plot_curves(results, path: str | Path) -> Path:
    """PNG of the sequential retention curves (left axis) and perplexity (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results.curves
    if not curves:
        raise ValueError("no curves to plot (only sequential mode records them)")
    x = [c["n_edits"] for c in curves]
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [k for k in curves[-1] if ":" in k]
    for key in keys:
        ax.plot(x, [c.get(key, float("nan")) for c in curves], marker="o", label=key)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("edits applied")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(x, [c.get("general/ppl", float("nan")) for c in curves], "k--", marker="s", label="perplexity")
    ax2.set_ylabel("perplexity (held text)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.set_title(f"{results.meta.get('editor_name')} on {results.meta.get('model')}: sequential editing")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_wandb(results, args: argparse.Namespace) -> None:
    import wandb

    mode = "online" if (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online") else "offline"
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        mode = os.environ["WANDB_MODE"]
    run = wandb.init(project=args.wandb_project, mode=mode, config={**vars(args), "meta": {
        k: v for k, v in results.meta.items() if k not in ("edit_seconds", "metrics")}},
        name=f"{results.meta['editor_name']}-{results.meta['mode']}")
    flat = {f"{side}/{k}": v for side in ("pre", "post") for k, v in results.summary[side].items()}
    flat.update({"edit_seconds_mean": results.meta.get("edit_seconds_mean"),
                 "peak_rss_mb": results.meta.get("peak_rss_mb")})
    run.summary.update({k: v for k, v in flat.items() if v is not None})
    for point in results.curves:
        run.log({f"curve/{k}": v for k, v in point.items() if k != "n_edits"}, step=point["n_edits"])
    run.finish()


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user fixes by changing the command or its files: one line, no traceback."""
    from kedit.checkpoint import BaseModelMismatch
    from kedit.data.request import RequestError
    from kedit.models.arch import UnsupportedArchitecture
    from kedit.models.loading import MissingModelPackage

    return (UsageError, RequestError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            MissingModelPackage, UnsupportedArchitecture, BaseModelMismatch)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; an expected user error is one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _main(argv)
    except SystemExit as err:
        if not isinstance(err.code, str):  # argparse: --help (0) or a usage error already printed (2)
            raise
        message = err.code
    except _user_errors() as err:
        log.debug("user error", exc_info=True)
        message = str(err)
    sys.stderr.write(f"python -m kedit.evaluate: error: {message}\n")
    return 2


def _out_path(args: argparse.Namespace) -> Path:
    """``--out``, or outputs/eval/<editor>-<mode>-<time>.json; checked writable before the run."""
    from kedit.atomic import check_writable

    stem = Path(args.editor).stem if Path(args.editor).exists() else args.editor
    out = Path(args.out) if args.out else Path("outputs") / "eval" / f"{stem}-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        check_writable(out)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write the results there ({err.strerror or err})") from None
    return out


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from kedit.atomic import atomic_write_text
    from kedit.data.loaders import load_requests_with_report
    from kedit.eval import EvalConfig, evaluate
    from kedit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = _out_path(args)
    refuse_untrained(args.editor)  # before loading anything
    requests, report = load_requests_with_report(args.data, format=args.format,
                                                 on_error="skip" if args.skip_bad else "raise", limit=args.limit)
    if args.skip_bad and hasattr(report, "summary"):
        log.info("%s", report.summary())
    if not requests:
        raise SystemExit(f"{args.data}: no edit requests")
    device = _device(args.device)
    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    editor = make_editor(args.editor, args.config, args.hparams, model)
    cfg = EvalConfig(batch_size=args.eval_batch_size, generation=not args.no_generation,
                     fluency=not args.no_fluency, fluency_new_tokens=args.fluency_tokens,
                     max_generation_prompts=args.generation_prompts, perplexity=not args.no_perplexity,
                     ppl_path=args.ppl_path, ppl_docs=args.ppl_docs, ppl_tokens=args.ppl_tokens,
                     curve_every=args.curve_every)
    results = evaluate(model, tok, editor, requests, mode=args.mode, batch_size=args.batch_size, config=cfg,
                       progress=not args.quiet)
    results.meta.update(data=str(args.data), seed=args.seed, argv=sys.argv[1:] if argv is None else argv)

    title = f"{results.meta['editor_name']} · {args.mode} · {len(requests)} requests · {Path(args.data).name}"
    sys.stdout.write(results.to_markdown(title))  # before writing: a failed write keeps the table
    try:
        atomic_write_text(out, results.to_json() + "\n")
    except OSError as err:
        raise UsageError(f"--out {out}: the results could not be written ({err.strerror or err}); "
                         "the table above has them") from None
    sys.stdout.write(f"\nresults: {out}\n")
    if args.plot is not None:
        if results.curves:
            png = plot_curves(results, args.plot or out.with_suffix(".png"))
            sys.stdout.write(f"plot: {png}\n")
        else:
            log.warning("--plot: only sequential mode records curves; nothing plotted")
    if args.wandb:
        log_wandb(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

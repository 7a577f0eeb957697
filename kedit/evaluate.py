"""``python -m kedit.evaluate``: edit a model with any editor and evaluate it honestly.

    python -m kedit.evaluate --model smollm2-135m --editor rome --config auto \\
        --data counterfact-sample --mode single --limit 10 --hparams.v_steps 10

Prints a markdown table of pre- and post-edit scores, writes every number to a JSON file
(``--out``), and optionally logs to W&B (``--wandb``) and plots the sequential curves (``--plot``).

The command line is a jsonargparse parser, like ``python -m kedit.train``: the fields of
:class:`kedit.eval.EvalConfig` are ``--eval.*`` and those of the editor's hyperparameter
dataclass ``--hparams.*``, typed and documented by their docstrings
(``python -m kedit.evaluate --editor rome --help`` lists ROME's).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("kedit.evaluate")


class UsageError(Exception):
    """A command line that cannot run (e.g. an untrained MEND, an unwritable --out)."""


EPILOG = """\
--editor is a registry name (ft-l, ft-m, lora, rome, memit, alphaedit, mend, serac) or the path
of a trained editor checkpoint (loaded with kedit.load_editor). Hyperparameters come from
--config (YAML of the editor's Hparams fields, a shipped config's name, or auto), overridden
field by field with --hparams.FIELD VALUE (e.g. --hparams.layers [5] --hparams.lr 1e-4);
--editor NAME --help lists the fields. --eval.FIELD VALUE sets what is measured
(e.g. --eval.fluency false --eval.ppl_docs 1).

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
  python -m kedit.evaluate --editor grace --config auto --mode sequential --data zsre:dev --skip-bad \\
      --limit 1000 --checkpoint outputs/grace-run    # run again to resume a stopped run
  python -m kedit.evaluate --editor checkpoints/mend-smollm2-135m-counterfact.safetensors --data zsre:dev --skip-bad
"""


def build_parser(hparams: type | None = None):
    """The jsonargparse parser of ``python -m kedit.evaluate``; with ``hparams`` (an editor's
    hyperparameter dataclass), its fields as ``--hparams.*``."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    from kedit.data.loaders import FORMATS
    from kedit.eval.runner import MODES, EvalConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = ArgumentParser(prog="python -m kedit.evaluate", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                       formatter_class=_help_formatter(), exit_on_error=False)
    g = p.add_argument_group("what to edit")
    g.add_argument("--model", default="smollm2-135m",
                   help="offline model name, local HF folder, .gguf file or hub id (default: %(default)s)")
    g.add_argument("--editor", required=True, help="registry name or path to a trained editor checkpoint")
    g.add_argument("--config", type=str | None, default=None,
                   help="the editor's hyperparameters: a YAML file, a shipped config's name (llama), or 'auto': "
                        "the values tuned for --model that ship with kedit (default: the dataclass defaults, the "
                        "papers' values); --hparams.FIELD overrides them")
    g.add_argument("--data", required=True,
                   help="edit requests: a dataset name (counterfact-sample: 48 records shipped with kedit; "
                        "counterfact[:dev|train], zsre[:dev|train], knowedit-zsre, mquake: from $KEDIT_DATA or "
                        "the hub) or a JSON / JSONL file (CounterFact, zsRE, KnowEdit, ...)")
    g.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="data format (default: detected from the records)")
    g.add_argument("--limit", type=int | None, default=None, help="use the first N requests")
    g.add_argument("--skip-bad", action="store_true", help="skip invalid records (reported) instead of failing")

    g = p.add_argument_group("how to edit")
    g.add_argument("--mode", choices=MODES, default="single",
                   help="single: edit/evaluate/restore each request; batch: chunks as one edit; "
                        "sequential: edits stacked one after another (default: %(default)s)")
    g.add_argument("--batch-size", type=int | None, default=None,
                   help="requests per edit (batch: default all; sequential: default 1; single: 1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                   help="model dtype (default: %(default)s)")
    g.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--checkpoint", type=str | None, default=None, metavar="DIR",
                   help="sequential mode: save the run to DIR at the curve points (and every "
                        "--eval.checkpoint_every requests); the same command resumes a stopped run from there")

    p.add_class_arguments(EvalConfig, "eval")
    if hparams is not None:
        p.add_class_arguments(hparams, "hparams")

    g = p.add_argument_group("outputs")
    g.add_argument("--out", type=str | None, default=None,
                   help="JSON results file (default: outputs/eval/<editor>-<mode>-<time>.json)")
    g.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="plot the sequential curves to PNG (default path: next to --out)")
    g.add_argument("--wandb", action="store_true",
                   help="log to Weights & Biases (offline unless WANDB_API_KEY or `wandb login` is set up)")
    g.add_argument("--wandb-project", default="kedit", help="W&B project (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def _help_formatter():
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, with the epilog's line breaks kept."""

    return HelpFormatter


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


def registry_hparams(spec: str) -> type | None:
    """The hyperparameter dataclass of registry editor ``spec``; None for a checkpoint path.
    UsageError when it is neither."""
    from kedit.editors.base import EDITORS, editor_class

    if spec.lower() in EDITORS:
        return editor_class(spec).Hparams
    if Path(spec).exists():
        return None
    raise UsageError(f"--editor {spec!r}: neither a registered editor ({', '.join(sorted(EDITORS))}) "
                     f"nor an existing checkpoint path")


def make_editor(args, parser, argv: list[str], model):
    """A registry editor: ``--config``'s values are the defaults of ``--hparams.*`` and the command
    line overrides them; or a trained editor from a checkpoint path."""
    import kedit
    from kedit.editors.base import editor_class

    if not hasattr(args, "hparams"):
        return kedit.load_editor(Path(args.editor), model)
    base = kedit.editor(args.editor, config=args.config, model=model).hparams
    parser.set_defaults({f"hparams.{f.name}": getattr(base, f.name) for f in dataclasses.fields(base)})
    hparams = parser.instantiate(_parse(parser, argv)).hparams
    return editor_class(args.editor)(hparams)


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user fixes by changing the command or its files: one line, no traceback."""
    from kedit.data.request import RequestError
    from kedit.eval.resume import CheckpointError
    from kedit.identity import EditMismatchError
    from kedit.models.arch import UnsupportedArchitecture
    from kedit.models.loading import MissingModelPackage

    return (UsageError, RequestError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            MissingModelPackage, UnsupportedArchitecture, EditMismatchError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; an expected user error is one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as err:
        if not isinstance(err.code, str):  # --help (0)
            raise
        message = err.code
    except _user_errors() as err:
        log.debug("user error", exc_info=True)
        message = str(err)
    sys.stderr.write(f"python -m kedit.evaluate: error: {message}\n")
    return 2


def _parse(parser, argv: list[str]):
    """``parser.parse_args``; what it refuses becomes a one-line UsageError."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        message = " ".join(str(err).split())
        if "hparams" in message:
            message += " (--hparams.FIELD VALUE sets a field; --editor NAME --help lists them)"
        raise UsageError(message) from None


def _editor_arg(argv: list[str]) -> str | None:
    """``--editor``'s value, read before the full parser (whose ``--hparams.*`` depend on it)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--editor")
    return pre.parse_known_args(argv)[0].editor


def _out_path(args) -> Path:
    """``--out``, or outputs/eval/<editor>-<mode>-<time>.json; checked writable before the run."""
    from kedit.atomic import check_writable

    stem = Path(args.editor).stem if Path(args.editor).exists() else args.editor
    out = Path(args.out) if args.out else Path("outputs") / "eval" / f"{stem}-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        check_writable(out)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write the results there ({err.strerror or err})") from None
    return out


def _main(argv: list[str]) -> int:
    spec = _editor_arg(argv)
    hparams = registry_hparams(spec) if spec else None
    if spec and hparams is None and any(a.startswith(("--config", "--hparams")) for a in argv):
        raise UsageError("--config/--hparams do not apply to a trained editor checkpoint")
    parser = build_parser(hparams)
    args = _parse(parser, argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from kedit.data.loaders import load_requests_with_report
    from kedit.eval import evaluate
    from kedit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = _out_path(args)
    refuse_untrained(args.editor)  # before loading anything
    if args.checkpoint and args.mode != "sequential":
        raise UsageError(f"--checkpoint: only sequential runs are checkpointed (--mode {args.mode})")
    requests, report = load_requests_with_report(args.data, format=args.format,
                                                 on_error="skip" if args.skip_bad else "raise", limit=args.limit)
    if args.skip_bad and hasattr(report, "summary"):
        log.info("%s", report.summary())
    if not requests:
        raise UsageError(f"{args.data}: no edit requests")
    model, tok = load_model(args.model, dtype=args.dtype, device=_device(args.device))
    editor = make_editor(args, parser, argv, model)
    results = evaluate(model, tok, editor, requests, mode=args.mode, batch_size=args.batch_size,
                       config=parser.instantiate(args).eval, progress=not args.quiet, checkpoint=args.checkpoint)
    results.meta.update(data=str(args.data), seed=args.seed, argv=argv)

    _report(results, args, out)
    return 0


def _report(results, args, out: Path) -> None:
    """The table on stdout, the JSON file, then the plot and W&B if asked for."""
    from kedit.atomic import atomic_write_text
    from kedit.eval.results import log_wandb, plot_curves

    meta = results.meta
    title = f"{meta['editor_name']} · {args.mode} · {meta['n_requests']} requests · {Path(args.data).name}"
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
        log_wandb(results, args.wandb_project, config=args.as_dict())


if __name__ == "__main__":
    sys.exit(main())

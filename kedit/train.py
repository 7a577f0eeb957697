"""``python -m kedit.train``: train learned editors (MEND, SERAC) with PyTorch Lightning.

    python -m kedit.train fit --config configs/mend/smollm2-counterfact.yaml --trainer trainers/cpu.yaml
    python -m kedit.train fit --config ... --trainer trainers/ddp.yaml --ckpt_path last   # resume
    python -m kedit.train export checkpoints/last.ckpt checkpoints/my-editor.safetensors
    python -m kedit.train fit --help

Any LightningModule / LightningDataModule can be named by ``class_path`` in the YAML
(subclass mode). Trainer presets (logger, checkpointing, devices) live in ``trainers/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    class KeditCLI(LightningCLI):
        """LightningCLI with ``export``: turn a training checkpoint into an editor artifact."""

        def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
            parser.add_argument("--export", type=str | None, default=None,
                                help="Also write the trained editor as a safetensors artifact to this "
                                     "path when fit ends (rank zero).")

        def _parse_ckpt_path(self) -> None:
            """Keep the configuration given on the command line when resuming from a checkpoint file.

            LightningCLI would parse the model's hyperparameters out of the checkpoint into the
            configuration, and cannot: kedit modules save them without a class path ("Parsing of
            ckpt_path hyperparameters failed!"). The command line's config is the run's config,
            for ``--ckpt_path last`` and for a file alike; the checkpoint must fit it (the editor's
            shapes and the base model are checked when it is loaded).
            """

        def before_instantiate_classes(self) -> None:
            from kedit.lightning.data import check_data_config

            if self.subcommand:  # missing data files: before the model, trainer and loggers are built
                check_data_config(self.config[self.subcommand].get("data"))

        def before_fit(self) -> None:
            from kedit.lightning.common import check_ckpt_path

            check_ckpt_path(self.trainer, self.config.get(self.subcommand, {}).get("ckpt_path"))
            export = self.config.get(self.subcommand, {}).get("export")
            if export:
                from kedit.lightning.common import ExportEditor

                self.trainer.callbacks.append(ExportEditor(export))

    return KeditCLI


def build_parser(exit_on_error: bool = False):
    """The parser of ``python -m kedit.train`` without running or instantiating anything.

    ``build_parser().parse_args(["fit", "--config", ..., "--trainer", ...])`` checks a
    configuration the way the CLI reads it (types included): used by the config tests.
    """
    from jsonargparse import set_parsing_settings
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    cls = _cli_class()
    cli = cls.__new__(cls)  # LightningCLI.__init__ up to setup_parser, without parsing argv
    cli.save_config_callback, cli.save_config_kwargs = None, {}
    cli.trainer_class, cli.trainer_defaults = Trainer, {}
    cli.seed_everything_default, cli.auto_configure_optimizers = True, True
    cli.parser_kwargs, cli.parser_class = {}, LightningArgumentParser
    cli.model_class, cli._model_class, cli.subclass_mode_model = None, LightningModule, True
    cli.datamodule_class, cli._datamodule_class, cli.subclass_mode_data = None, LightningDataModule, True
    sub = {name: {"exit_on_error": exit_on_error} for name in cli.subcommands()}
    cli.setup_parser(True, {"exit_on_error": exit_on_error}, sub)
    return cli.parser


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write the editor of a Lightning checkpoint (``.ckpt``) as an editor artifact."""
    from kedit.lightning.common import export_checkpoint

    return export_checkpoint(ckpt, out)


def _export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kedit.train export",
                                     description="Export a training checkpoint (.ckpt) as an editor "
                                                 "artifact (.safetensors) for kedit.load_editor.")
    parser.add_argument("ckpt", help="Lightning checkpoint written by `python -m kedit.train fit`")
    parser.add_argument("out", help="output .safetensors file (or folder)")
    args = parser.parse_args(argv)
    path = export(args.ckpt, args.out)
    print(f"wrote {path}")
    return 0


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m kedit.train`` / ``kedit-train``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":
        raise SystemExit(_export_main(argv[1:]))
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    kedit_log = logging.getLogger("kedit")
    kedit_log.addHandler(handler)
    kedit_log.setLevel(logging.INFO)
    from kedit.data.request import RequestError
    from kedit.identity import EditMismatchError
    from kedit.lightning.common import TrainSetupError
    from kedit.models.loading import MissingModelPackage, ModelNotFound
    from kedit.lightning.wandb_tmp import import_wandb

    import_wandb()  # before the config is parsed: parsing the W&B logger's signature imports wandb

    try:
        _cli_class()(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as err:  # noqa: BLE001 - the user's errors become one line, others propagate
        user = (TrainSetupError, RequestError, EditMismatchError, ModelNotFound, MissingModelPackage)
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, user):  # jsonargparse wraps what __init__ raised
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise SystemExit(f"error: {cause}") from None


if __name__ == "__main__":
    main()

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

        def before_fit(self) -> None:
            export = self.config.get(self.subcommand, {}).get("export")
            if export:
                from kedit.lightning.common import ExportEditor

                self.trainer.callbacks.append(ExportEditor(export))

    return KeditCLI


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
    _cli_class()(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


if __name__ == "__main__":
    main()

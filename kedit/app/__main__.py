"""``python -m kedit.app [--model NAME] [--host 127.0.0.1] [--port 7860] [--share]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("kedit.app")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kedit.app", description="kedit's live editing web app")
    p.add_argument("--model", default="smollm2-135m",
                   help="any name or path kedit.load_model accepts (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also open a public gradio share link (off by default)")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                   help="folder of trained editors (*.safetensors) offered beside the registered editors")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--max-new-tokens", type=int, default=6, help="tokens of each compared answer")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from kedit.app.core import ModelLoader
    from kedit.app.ui import build, launch

    if args.threads:
        torch.set_num_threads(args.threads)
    # the page is served at once and shows the loading progress (dequantizing a GGUF the first time)
    # (started once the server is up: loading competes with gradio's start-up for the GIL)
    loader = ModelLoader(args.model, checkpoints=args.checkpoints, max_new_tokens=args.max_new_tokens)
    page = build(loader)
    launch(page, host=args.host, port=args.port, share=args.share, block=False)
    log.info("serving on http://%s:%d while %s loads", args.host, args.port, args.model)
    loader.start()
    page.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())

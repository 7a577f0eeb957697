"""The demo (``make demo``): a real model answers factual prompts; then one fact is edited.

    python -m kedit.demo                         # smollm2-135m, ROME edit "Eiffel Tower -> Rome"
    python -m kedit.demo --editor none           # only the answers of the unedited model
    python -m kedit.demo --model gemma3-270m --editor ft-l --target-new London

Steps, one function each so the demo can grow: :func:`answer` (greedy continuations),
:func:`make_edit` (any registered editor), :func:`compare` (the same prompts with the edit
applied and after restoring it), :func:`format_table`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kedit.eval.scoring import AnswerRow, answers

log = logging.getLogger(__name__)

# The fact to edit and the prompts to watch: the edited prompt, a paraphrase (should follow
# the edit) and neighbours (must keep their answers).
EDIT_PROMPT = "The Eiffel Tower is located in the city of"
EDIT_SUBJECT = "The Eiffel Tower"
EDIT_TARGET_TRUE = "Paris"
EDIT_TARGET_NEW = "Rome"
PARAPHRASES = ["The Eiffel Tower is in"]
NEIGHBOURS = [
    "The Louvre is located in the city of",
    "The capital of France is",
    "The Colosseum is located in the city of",
    "The capital of Germany is",
]


ONE_TIME = ("kedit.models.loading", "kedit.stats")
"""Loggers whose INFO lines announce the first run's one-time costs, cached afterwards."""


@dataclass
class Row(AnswerRow):
    restored: str | None = None
    """The answer after the edit is restored (must equal ``before``)."""


def demo_request(target_new: str = EDIT_TARGET_NEW) -> dict:
    return {"prompt": EDIT_PROMPT, "subject": EDIT_SUBJECT, "target_new": target_new,
            "target_true": EDIT_TARGET_TRUE, "paraphrase_prompts": PARAPHRASES}


def editor_config(editor_name: str, model, model_name: str, config: str | None = "auto") -> Path | None:
    """The hyperparameter YAML for the demo: ``config`` itself (a path or a shipped config's
    name), or with ``"auto"`` the shipped ``configs/<editor>/<model name>.yaml`` or
    ``configs/<editor>/<model_type>.yaml`` if there is one (None: the dataclass defaults, i.e.
    the papers' values)."""
    from kedit import paths

    if config in (None, "none"):
        return None
    if config != "auto":
        return paths.config_path(editor_name, config)
    return paths.tuned_config(editor_name, model, model_name)


def make_edit(model, tokenizer, editor_name: str, request: dict, config: Path | None = None):
    """Compute the edit with a registered editor (``config``: its hyperparameter YAML, or defaults)."""
    import kedit

    return kedit.editor(editor_name, config=config).edit(model, tokenizer, [request])


def compare(model, tokenizer, rows: list[Row], edit, max_new_tokens: int) -> None:
    """Fill ``after`` (edit applied) and ``restored`` (after restoring) of each row."""
    prompts = [r.prompt for r in rows]
    with edit.applied(model):
        for row, text in zip(rows, answers(model, tokenizer, prompts, max_new_tokens)):
            row.after = text
    for row, text in zip(rows, answers(model, tokenizer, prompts, max_new_tokens)):
        row.restored = text


def format_table(rows: list[Row]) -> str:
    cols = [("", lambda r: r.kind), ("prompt", lambda r: r.prompt), ("answer", lambda r: r.before)]
    if any(r.after is not None for r in rows):
        cols += [("edited", lambda r: r.after), ("restored", lambda r: r.restored)]
    cells = [[h for h, _ in cols]] + [[str(f(r) or "") for _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kedit.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="offline model name, local HF folder, .gguf file or hub id (default: %(default)s)")
    p.add_argument("--editor", default="rome",
                   help="registered editor to apply (rome, memit, alphaedit, ft-l, ft-m, lora, ...), or 'none'")
    p.add_argument("--config", default="auto",
                   help="hyperparameter YAML of the editor; 'auto' (default): configs/<editor>/<model or "
                        "model_type>.yaml when the checkout has one; 'none': the dataclass defaults (papers' values)")
    p.add_argument("--target-new", default=EDIT_TARGET_NEW, help="new answer for the edited fact")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--data", default="counterfact-sample",
                   help="records for the evaluation table: a dataset name (kedit.data.named) or a "
                        "CounterFact/zsRE file (default: %(default)s, the 48 records that ship with kedit)")
    p.add_argument("--eval-records", type=int, default=2,
                   help="records evaluated after the demo edit, single mode (0: skip the table)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    for name in ONE_TIME:  # say so when a one-time cost (dequantizing, statistics) is paid
        logging.getLogger(name).setLevel(logging.INFO)
    import torch

    from kedit import paths
    from kedit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"loaded in {time.perf_counter() - t0:.1f} s)")

    prompts = [("edit", EDIT_PROMPT)] + [("paraphrase", p) for p in PARAPHRASES] + \
              [("neighbour", p) for p in NEIGHBOURS]
    before = answers(model, tok, [p for _, p in prompts], args.max_new_tokens)
    rows = [Row(kind, prompt, text) for (kind, prompt), text in zip(prompts, before)]

    edited = False
    if args.editor.lower() != "none":
        request = demo_request(args.target_new)
        config = editor_config(args.editor, model, args.model, args.config)
        shown = config.relative_to(paths.PACKAGE) if config and config.is_relative_to(paths.PACKAGE) else config
        print(f"edit: {args.editor} ({shown or 'default hyperparameters'}): "
              f"{EDIT_PROMPT!r} {EDIT_TARGET_TRUE} -> {args.target_new}")
        t0 = time.perf_counter()
        try:
            edit = make_edit(model, tok, args.editor, request, config)
        except (ImportError, AttributeError, NotImplementedError) as err:
            # an editor registered but not (yet) available in this install
            print(f"editor {args.editor!r} is not available ({err}); showing the unedited model only")
        else:
            print(f"edit computed in {time.perf_counter() - t0:.1f} s")
            compare(model, tok, rows, edit, args.max_new_tokens)
            edited = True
    print()
    print(format_table(rows))
    if edited and args.eval_records > 0:
        print()
        print(evaluation_table(model, tok, args.editor, args.data, args.eval_records, config))
    return 0


def evaluation_table(model, tokenizer, editor_name: str, data: str | None, n: int,
                     config: Path | None = None) -> str:
    """Single-mode evaluation of ``editor_name`` on the first ``n`` records (markdown)."""
    import kedit
    from kedit.data import load_requests
    from kedit.data.named import SAMPLE
    from kedit.eval import EvalConfig, evaluate

    data = data or SAMPLE
    requests = load_requests(data, limit=n, on_error="skip")
    print(f"\nevaluating {editor_name} on the first {len(requests)} records of {data} (single mode) ...")
    eval_config = EvalConfig(fluency=False, max_generation_prompts=1, ppl_docs=2, ppl_tokens=128)
    results = evaluate(model, tokenizer, kedit.editor(editor_name, config=config), requests, mode="single",
                       config=eval_config, progress=True)
    return results.to_markdown()


if __name__ == "__main__":
    sys.exit(main())

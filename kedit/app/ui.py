"""The web page (gradio) over a :class:`~kedit.app.core.Workbench`.

Each handler turns the page's fields into one workbench step and its result into markdown.
A user error (kedit's validation, a foreign edit file) is shown in the status line, with the
fingerprint that proves the model unchanged; it never reaches the log as a traceback.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from kedit.app.core import (USER_ERRORS, HistoryRow, ModelLoader, Row, Workbench, editor_choices, example_fields,
                             example_labels)
from kedit.editors.base import EditStateError

log = logging.getLogger(__name__)

CSS = """
#status {min-height: 2.5em}
.kedit-table table {font-size: 0.9em}
.kedit-table th, .kedit-table td:first-child, .kedit-table td:nth-child(5) {white-space: nowrap}
"""


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ") or "∅"


def _pct(p: float | None) -> str:
    return "" if p is None else f"{100 * p:.1f}%"


def _move(pair: tuple[float, float | None]) -> str:
    a, b = pair
    return _pct(a) if b is None else f"{_pct(a)} → {_pct(b)}"


def rows_markdown(rows: list[Row], target_new: str = "", edited: bool = True) -> str:
    """Before / after, side by side: answers, whether they changed, and target probabilities."""
    if not rows:
        return ""
    if edited:
        head = f"| | prompt | before | after | changed | p(old) | p({_cell(target_new)}) |\n|---|---|---|---|---|---|---|\n"
        body = "".join(f"| {r.kind} | {_cell(r.prompt)} | {_cell(r.before)} | **{_cell(r.after or '')}** | "
                       f"{'changed' if r.changed else 'same'} | {_cell(r.old)} {_move(r.p_old)} | "
                       f"{_move(r.p_new)} |\n" for r in rows)
        return head + body
    head = "| | prompt | answer now |\n|---|---|---|\n"
    return head + "".join(f"| {r.kind} | {_cell(r.prompt)} | {_cell(r.before)} |\n" for r in rows)


def history_markdown(history: list[HistoryRow]) -> str:
    if not history:
        return "*No edit applied: the model is the unedited one.*"
    head = "| # | editor | fact | time |\n|---:|---|---|---:|\n"
    return head + "".join(f"| {i} | {_cell(h.editor)} | {_cell(h.fact)} | {h.seconds:.1f} s |\n"
                          for i, h in enumerate(history, 1))


def state_markdown(wb: Workbench) -> str:
    try:
        n, fp = wb.snapshot()
    except EditStateError as err:  # the model is still loading (ModelLoader.pending)
        return f"⏳ *{err}*"
    now = time.strftime("%H:%M:%S")
    return f"**{wb.model_name}** · edits applied: **{n}** · fingerprint `{fp}` · read at {now}.{int(time.time() * 1000) % 1000:03d}"


def build(source: Workbench | ModelLoader) -> Any:
    """The gradio Blocks of the app (not launched), over a workbench or a loader still loading
    its model: the page is served at once and shows the loading progress until it is there."""
    import gradio as gr

    loader = source if isinstance(source, ModelLoader) else None
    wb = loader.pending() if loader is not None else source

    def ready() -> bool:
        return loader is None or loader.workbench is not None

    choices = list(wb.choices) if ready() else [c.label for c in editor_choices(loader.checkpoints)]
    default = "rome" if "rome" in choices else choices[0]
    downloads = Path(tempfile.mkdtemp(prefix="kedit-app-"))

    def ok(message: str) -> str:
        return f"**Done.** {message}"

    def refused(err: BaseException) -> str:
        if not ready():
            return f"**Refused:** {err}"
        n, fp = wb.snapshot()
        return f"**Refused:** {err}  \n*The model is unchanged ({n} edit(s) applied, fingerprint `{fp}`).*"

    def history_now() -> str:
        return history_markdown(wb.history if ready() else [])

    with gr.Blocks(title="kedit: live knowledge editing", analytics_enabled=False) as page:
        gr.Markdown("## kedit — edit a fact, compare before and after, undo, share")
        with gr.Row():
            state = gr.Markdown(state_markdown(wb), elem_id="state")
            refresh = gr.Button("Refresh", elem_id="refresh", size="sm", scale=0)
        status = gr.Markdown("", elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                editor = gr.Dropdown(choices, value=default, label="Editor", elem_id="editor")
                with gr.Accordion("Hyperparameters (editable)", open=False):
                    hparams = gr.Code(wb.hparams_text(default) if ready() else "", language="yaml",
                                      elem_id="hparams", interactive=True)
                with gr.Row():
                    example = gr.Dropdown(example_labels(), label="Fill from an example",
                                          elem_id="example", scale=3)
                    fill = gr.Button("Fill", elem_id="fill", scale=0)
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                with gr.Row():
                    subject = gr.Textbox(label="Subject (in the prompt)", elem_id="subject")
                    target = gr.Textbox(label="New target", elem_id="target")
                    target_true = gr.Textbox(label="Old target (optional)", elem_id="target-true")
                paraphrases = gr.Textbox(label="Paraphrases (one per line)", lines=2, elem_id="paraphrases")
                neighbours = gr.Textbox(label="Neighbour prompts that must not change (one per line)", lines=3,
                                        elem_id="neighbours")
                apply = gr.Button("Apply edit", variant="primary", elem_id="apply")
            with gr.Column(scale=4, min_width=480):
                compare = gr.Markdown("", elem_id="compare", elem_classes="kedit-table")
                gr.Markdown("### History")
                history = gr.Markdown(history_now(), elem_id="history", elem_classes="kedit-table")
                with gr.Row():
                    undo = gr.Button("Undo last", elem_id="undo")
                    restore = gr.Button("Restore all", elem_id="restore")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=320):
                gr.Markdown("### Chat with the model as it now stands")
                chat_in = gr.Textbox(label="Prompt", elem_id="chat-in")
                chat_btn = gr.Button("Generate", elem_id="chat-btn")
                chat_out = gr.Textbox(label="Continuation", interactive=False, elem_id="chat-out")
            with gr.Column(min_width=320):
                gr.Markdown("### Share")
                what = gr.Radio([("the last edit", "last"), ("the whole stack", "stack")], value="last",
                                label="Download", elem_id="what")
                download = gr.Button("Download", elem_id="download")
                file_out = gr.File(label="kedit edit file", interactive=False, elem_id="download-file")
                upload = gr.File(label="Upload an edit file (.safetensors)", file_types=[".safetensors"],
                                 elem_id="upload")
        with gr.Accordion("Evaluate the applied edits (single mode)", open=True):
            eval_btn = gr.Button("Evaluate", elem_id="eval-btn")
            eval_out = gr.Markdown("", elem_id="eval-out", elem_classes="kedit-table")

        # ---- handlers: each returns the status line plus what it changed

        def on_editor(label):
            try:
                return wb.hparams_text(label), ""
            except USER_ERRORS as err:
                return "", refused(err)

        def on_fill(label):
            if not label:
                return [gr.update()] * 6 + ["**Refused:** choose an example first"]
            f = example_fields(label)
            return (f["prompt"], f["subject"], f["target_new"], f["target_true"], f["paraphrases"],
                    f["neighbours"], "")

        def on_apply(label, yaml_text, p, s, t, tt, para, neigh, progress=gr.Progress(track_tqdm=True)):
            try:
                req = wb.request(p, s, t, tt, para, neigh)
                rows, seconds = wb.apply(label, yaml_text, req, progress=lambda m: progress(None, desc=m))
            except USER_ERRORS as err:
                return refused(err), gr.update(), history_now(), state_markdown(wb)
            except Exception as err:  # noqa: BLE001 - an editor that fails (untrained, unsupported model)
                log.exception("the %s edit failed", label)
                return refused(RuntimeError(f"the {label} editor failed: {type(err).__name__}: {err}")), \
                    gr.update(), history_now(), state_markdown(wb)
            return (ok(f"{label} edit applied in {seconds:.1f} s: {req.prompt!r} → {req.target_new!r}"),
                    rows_markdown(rows, req.target_new), history_now(), state_markdown(wb))

        def after_undo(step):
            try:
                message = step()
            except USER_ERRORS as err:
                return refused(err), gr.update(), history_now(), state_markdown(wb)
            return ok(message), rows_markdown(wb.answers_now(), edited=False), history_now(), \
                state_markdown(wb)

        def on_chat(text):
            try:
                return wb.chat(text), ""
            except USER_ERRORS as err:
                return "", refused(err)

        def on_download(kind):
            try:
                path = wb.download(kind, downloads)
            except USER_ERRORS as err:
                return None, refused(err)
            return str(path), ok(f"saved {path.name}: download it below")

        def on_upload(file):
            if file is None:
                return gr.update(), gr.update(), gr.update(), gr.update(), None
            path = file if isinstance(file, str) else getattr(file, "name", str(file))
            try:
                message = wb.upload(path)
            except USER_ERRORS as err:  # the box is emptied, ready for the next file
                return refused(err), gr.update(), history_now(), state_markdown(wb), None
            return ok(message), rows_markdown(wb.answers_now(), edited=False), history_now(), \
                state_markdown(wb), None

        def on_evaluate(progress=gr.Progress(track_tqdm=True)):
            try:
                return wb.evaluate(), ok("evaluation done")
            except USER_ERRORS as err:
                return "", refused(err)

        main = [status, compare, history, state]
        editor.change(on_editor, editor, [hparams, status])
        fill.click(on_fill, example, [prompt, subject, target, target_true, paraphrases, neighbours, status])
        apply.click(on_apply, [editor, hparams, prompt, subject, target, target_true, paraphrases, neighbours],
                    main)
        undo.click(lambda: after_undo(wb.undo), None, main)
        restore.click(lambda: after_undo(wb.restore_all), None, main)
        refresh.click(lambda: state_markdown(wb), None, state, show_progress="hidden")
        chat_btn.click(on_chat, chat_in, [chat_out, status])
        download.click(on_download, what, [file_out, status])
        upload.upload(on_upload, upload, [*main, upload])
        # a page opened (or reloaded) later shows the shared model as it now stands
        page.load(lambda: (state_markdown(wb), history_now()), None, [state, history],
                  show_progress="hidden")
        eval_btn.click(on_evaluate, None, [eval_out, status])
        if loader is not None:  # the page is served while the model loads: show how far it got
            timer = gr.Timer(1.0, active=not ready())

            def on_tick(label):
                if loader.error is not None:
                    return (f"**Could not load the model:** {loader.error}", gr.update(), gr.update(),
                            gr.Timer(active=False))
                if not ready():
                    return state_markdown(wb), gr.update(), gr.update(), gr.Timer(active=True)
                try:
                    text = wb.hparams_text(label)
                except USER_ERRORS as err:
                    return refused(err), gr.update(), history_now(), gr.Timer(active=False)
                return state_markdown(wb), text, history_now(), gr.Timer(active=False)

            timer.tick(on_tick, editor, [state, hparams, history, timer], show_progress="hidden")
    page.queue(default_concurrency_limit=4)
    return page


def launch(page: Any, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True) -> Any:
    """Serve the page on ``host:port`` (loopback unless asked); ``block=False`` returns at once."""
    return page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       inbrowser=False, quiet=not block, css=CSS, show_error=False, footer_links=[])

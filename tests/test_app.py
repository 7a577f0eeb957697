"""The app's logic (kedit.app.core) on tiny models: edit, compare, undo, restore, share,
evaluate, errors, and the lock between sessions. The page itself: tests/test_app_browser.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kedit.app.core import Workbench, editor_choices
from kedit.data import RequestError
from kedit.editors import EditMismatchError, EditStack
from kedit.eval.runner import fingerprint

# FT-M on the first layer with a large step: a visible edit of a tiny model in well under a second
FAST = "layers: [0]\nnum_steps: 8\nlr: 0.05\nnorm_constraint: null\nobjective: target\nearly_stop_loss: null\n"


def fact(wb: Workbench, target: str = "Rome", neighbours: str = "The capital of Spain is"):
    return wb.request("The capital of France is", "France", target, "", "The French capital is", neighbours)


@pytest.fixture
def wb(tiny) -> Workbench:
    model, tok = tiny("llama")
    return Workbench(model, tok, "tiny-llama-app", max_new_tokens=4)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_apply_compares_before_and_after_and_adds_a_history_row(wb):
    base = wb.snapshot()
    rows, seconds = wb.apply("ft-m", FAST, fact(wb))
    assert [r.kind for r in rows] == ["edit", "paraphrase", "neighbour"]
    assert all(r.after is not None and r.changed == (r.after != r.before) for r in rows)
    assert rows[0].p_new[1] > rows[0].p_new[0]  # the new target's probability moved up
    assert len(wb.history) == 1 and wb.history[0].editor == "ft-m" and seconds >= 0
    assert wb.history[0].request.neighborhood[0].answer  # the unedited answer, filled in
    n, fp = wb.snapshot()
    assert n == 1 and fp != base[1]


def test_undo_and_restore_all_are_bit_exact(wb):
    original = state(wb.model)
    wb.apply("ft-m", FAST, fact(wb))
    after_one = state(wb.model)
    wb.apply("ft-m", FAST, fact(wb, "Berlin"))
    assert not same(wb.model, after_one)
    message = wb.undo()
    assert same(wb.model, after_one) and "bit-exactly" in message and len(wb.history) == 1
    message = wb.restore_all()
    assert same(wb.model, original) and "bit-exactly the unedited one" in message
    assert wb.history == [] and wb.snapshot()[0] == 0


@pytest.mark.parametrize("subject, target, field", [("Germany", "Rome", "subject"), ("France", "", "target_new")])
def test_invalid_fact_raises_kedits_request_error_naming_the_field(wb, subject, target, field):
    with pytest.raises(RequestError) as err:
        wb.request("The capital of France is", subject, target)
    assert err.value.field == field and field in str(err.value)


def test_bad_hyperparameters_are_refused_and_the_model_is_unchanged(wb):
    before = state(wb.model)
    with pytest.raises(ValueError, match="hyperparameters"):
        wb.apply("ft-m", "num_steps: many\n", fact(wb))
    assert same(wb.model, before) and wb.history == []


def test_an_editor_that_fails_leaves_the_model_and_history_unchanged(wb, monkeypatch):
    from kedit.editors.ft import FTM

    def broken(self, model, tok, requests, **kwargs):
        raise RuntimeError("this editor cannot edit this model")

    before = state(wb.model)
    monkeypatch.setattr(FTM, "edit", broken)
    with pytest.raises(RuntimeError, match="cannot edit"):
        wb.apply("ft-m", FAST, fact(wb))
    assert same(wb.model, before) and wb.history == [] and wb.snapshot()[0] == 0


def test_download_restore_upload_gives_the_same_model(wb, tmp_path):
    wb.apply("ft-m", FAST, fact(wb))
    edited = state(wb.model)
    path = wb.download("last", tmp_path)
    assert path.suffix == ".safetensors" and same(wb.model, edited)  # saving leaves it applied
    wb.restore_all()
    wb.upload(path)
    assert same(wb.model, edited) and wb.history[-1].source.startswith("upload")


def test_a_stack_file_round_trips_every_edit(wb, tmp_path):
    wb.apply("ft-m", FAST, fact(wb))
    wb.apply("ft-m", FAST, fact(wb, "Berlin"))
    edited = state(wb.model)
    path = wb.download("stack", tmp_path)
    wb.restore_all()
    wb.upload(path)
    assert same(wb.model, edited) and len(wb.history) == 2


def test_an_edit_for_another_base_model_is_refused_with_kedits_message(wb, tiny, tmp_path):
    other = Workbench(*tiny("llama", seed=1), "tiny-llama-other", max_new_tokens=4)
    other.apply("ft-m", FAST, fact(other))
    path = other.download("last", tmp_path)
    before = state(wb.model)
    with pytest.raises(EditMismatchError, match="computed on"):
        wb.upload(path)
    assert same(wb.model, before) and wb.history == [] and wb.snapshot()[0] == 0


def test_a_file_that_is_not_an_edit_is_refused(wb, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        wb.upload(bad)
    assert wb.snapshot()[0] == 0


def test_two_sessions_never_see_a_half_restored_stack(wb, monkeypatch):
    """Session A restores a stack of two edits slowly; session B reads the model meanwhile.
    Under the lock B sees all edits or none, never one of two."""
    wb.apply("ft-m", FAST, fact(wb))
    wb.apply("ft-m", FAST, fact(wb, "Berlin"))
    full, base = wb.fingerprints[2], wb.fingerprints[0]
    slow_restore = EditStack.restore
    started = threading.Event()

    def restore(self, model):
        started.set()
        time.sleep(0.2)  # windows before and after the weights go back, with the lock held
        slow_restore(self, model)
        time.sleep(0.2)

    monkeypatch.setattr(EditStack, "restore", restore)
    seen: list[tuple] = []
    a = threading.Thread(target=wb.restore_all)
    a.start()
    assert started.wait(30)
    while True:  # at least one read after A began, however late this thread is scheduled (a loaded CI machine)
        with wb.lock:
            seen.append(fingerprint(wb.model))
        if not a.is_alive():
            break
        time.sleep(0.01)
    a.join()
    assert seen and set(seen) <= {full, base}


def test_the_one_time_statistics_are_announced_to_the_page(wb, tmp_path):
    said: list[str] = []
    rome = f"layers: [0]\nstats_tokens: 512\nstats_cache_dir: {tmp_path}\nv_steps: 2\n"
    wb.apply("rome", rome, fact(wb), progress=said.append)
    assert any("second moments" in m and "once" in m for m in said), said


def test_answers_are_computed_once_per_model_state(wb, monkeypatch):
    import kedit.app.core as core

    calls = []
    real = core.answers
    monkeypatch.setattr(core, "answers", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first, _ = wb.apply("ft-m", FAST, fact(wb))
    wb.undo()
    again, _ = wb.apply("ft-m", FAST, fact(wb))  # same state before, same edit after: nothing to generate
    assert len(calls) == 2 and [r.before for r in again] == [r.before for r in first]
    assert [r.after for r in again] == [r.after for r in first]
    # before: the state after the first edit (seen); after: a new state, answered once more
    wb.apply("ft-m", FAST, fact(wb, "Berlin"))
    assert len(calls) == 3


def test_chat_generates_from_the_model_as_it_stands(wb):
    before = wb.chat("The capital of France is", max_new_tokens=4)
    wb.apply("ft-m", FAST, fact(wb))
    assert wb.chat("The capital of France is", max_new_tokens=4) != before
    with pytest.raises(ValueError, match="type a prompt"):
        wb.chat("  ")


def test_evaluate_shows_teacher_forced_and_generation_scores_and_keeps_the_edits(wb):
    wb.apply("ft-m", FAST, fact(wb))
    edited = state(wb.model)
    table = wb.evaluate(progress=False)
    assert "| rewrite/es |" in table and "| rewrite/gen |" in table and "| neighborhood/ns |" in table
    assert same(wb.model, edited)


def test_editors_offer_every_registered_one_and_the_trained_checkpoints(wb):
    from kedit import paths
    from kedit.editors.base import EDITORS

    labels = [c.label for c in editor_choices(paths.PACKAGE.parent / "checkpoints")]
    assert set(EDITORS) <= set(labels)
    assert any(label.startswith("mend (trained") for label in labels)
    assert "layers: [5]" in wb.hparams_text("rome")  # the tuned llama config


def test_the_shown_hyperparameters_parse_back_to_the_same_values(wb):
    from kedit.app.core import parse_hparams
    from kedit.editors.base import EDITORS

    for name in EDITORS:
        ed = wb.editor(name)
        assert parse_hparams(type(ed.hparams), wb.hparams_text(name)) == ed.hparams, name


def test_edited_hyperparameters_are_used(wb):
    text = wb.hparams_text("ft-m").replace("num_steps: 25", "num_steps: 3")
    assert wb.editor("ft-m", text).hparams.num_steps == 3


def test_fill_from_an_example_gives_the_records_fields(wb):
    label = wb.example_labels()[0]
    fields = wb.example_fields(label)
    record = wb.examples()[0]
    assert fields["prompt"] == record.prompt and fields["subject"] == record.subject
    assert fields["paraphrases"].splitlines() == record.paraphrase_prompts


def test_the_app_binds_to_loopback_and_shares_nothing_by_default():
    from kedit.app.__main__ import parse_args

    args = parse_args([])
    assert args.host == "127.0.0.1" and not args.share and args.model == "smollm2-135m"


def test_the_page_is_served_while_the_model_loads_and_shows_how_far_it_got(tiny):
    """The page is built before the model is there: it shows the loading steps (the one-time
    dequantizing is forwarded from kedit.models.loading), refuses every step until then, and
    works once the model is loaded."""
    import logging

    from kedit.app.core import ModelLoader
    from kedit.editors.base import EditStateError

    release = threading.Event()

    def slow_load(name):
        logging.getLogger("kedit.models.loading").info("dequantizing %s from x.gguf (once; cached in y)", name)
        release.wait(600)  # the test sets it (gradio's page build can take a while on a busy machine)
        return tiny("llama")

    loader = ModelLoader("tiny-llama-app", max_new_tokens=4, load=slow_load).start()
    try:
        deadline = time.time() + 60
        while "dequantizing" not in loader.status() and time.time() < deadline:
            time.sleep(0.01)
        assert "dequantizing tiny-llama-app" in loader.status() and loader.workbench is None
        with pytest.raises(EditStateError, match="not loaded yet: dequantizing"):
            loader.pending().apply("ft-m", FAST, None)
        pytest.importorskip("gradio")  # the [dev] extra: the page itself builds while loading
        from kedit.app.ui import build, state_markdown

        build(loader)
        assert "not loaded yet" in state_markdown(loader.pending())
        release.set()
        wb = loader.wait(120)
        assert loader.status().startswith("loaded tiny-llama-app in")
        rows, _ = loader.pending().apply("ft-m", FAST, fact(wb))
        assert rows[0].after and len(wb.history) == 1
        assert "edits applied: **1**" in state_markdown(loader.pending())
    finally:
        release.set()


def test_a_model_that_cannot_load_is_reported_in_the_page():
    from kedit.app.core import ModelLoader
    from kedit.models import ModelNotFound

    def missing(name):
        raise ModelNotFound(f"no model named {name!r}")

    loader = ModelLoader("nope", load=missing).start()
    with pytest.raises(ModelNotFound, match="no model named 'nope'"):
        loader.wait(10)
    assert loader.status() == "could not load nope: no model named 'nope'"


def test_the_state_line_sees_a_weight_changed_behind_the_apps_back(wb):
    """The state line reuses the last fingerprint only while no weight was written through its
    parameter and the hooks are the same: a change made outside the app shows at once."""
    n, before = wb.snapshot()
    p = next(wb.model.parameters())
    with torch.no_grad():
        p[0, 0] += 1.0
    changed = wb.snapshot()
    assert changed[0] == n and changed[1] != before
    hook = wb.model.register_forward_hook(lambda *a: None)  # a routing-like hook counts too
    try:
        assert wb.snapshot()[1] != changed[1]
    finally:
        hook.remove()
    assert wb.snapshot() == changed

"""GRACE (kedit.editors.grace): routing, the official codebook maintenance, the adaptor that
serves the union of applied edits, sequence state read from history, save/load."""

from __future__ import annotations

import pytest
import torch

from kedit.data import encode
from kedit.editors import Edit, EditMismatchError, EditStack
from kedit.editors.base import EditStateError
from kedit.editors.grace import (
    GRACE,
    SPLIT_MARGIN,
    Adaptor,
    Codebook,
    GRACEEdit,
    GRACEHparams,
    maintain,
    route,
)
from kedit.hooks import run_until, trace
from kedit.testing import tiny_model

A = {"prompt": "The capital city of France", "target_new": "is Rome"}
B = {"prompt": "The sport of Michael Jordan", "target_new": "is soccer"}
C = {"prompt": "The city of the Eiffel Tower", "target_new": "is Berlin"}
UNRELATED = ["A cat sat on the mat", "The weather in March"]
LAYER = 1
MODULE = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", 0, initializer_range=0.2)


def grace(**kw) -> GRACE:
    return GRACE(layer=LAYER, n_iter=20, **kw)


def query(model, tok, prompt: str) -> torch.Tensor:
    """The wrapped layer's input at the prompt's last token."""
    batch = encode(tok, [prompt])
    with torch.no_grad(), trace(model, MODULE, inputs=True, outputs=False, stop=MODULE) as seen:
        run_until(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return seen[MODULE].input[0, -1].float()


def logits(model, tok, prompts) -> torch.Tensor:
    batch = encode(tok, prompts)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def layer_output(model, tok, prompt: str) -> torch.Tensor:
    batch = encode(tok, [prompt])
    with torch.no_grad(), trace(model, MODULE) as seen:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return seen[MODULE].output[0, -1]


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def radii(model) -> list[float]:
    adaptor = model.get_submodule(MODULE).__dict__.get(Adaptor.ATTR)
    return [] if adaptor is None else [e.radius for e in adaptor.book.entries.values()]


# --------------------------------------------------------------------------- routing


def test_route_replaces_inside_the_radius_and_defers_outside():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    values = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    radii_ = torch.tensor([1.0, 0.5], dtype=torch.float64)
    h = torch.tensor([[[0.5, 0.5], [10.0, 0.6], [5.0, 0.0], [9.8, 0.0]]])  # inside 0, outside, far, inside 1
    out = torch.full((1, 4, 3), -1.0)
    got = route(h, out, keys, values, radii_)
    torch.testing.assert_close(got[0], torch.tensor([[1.0] * 3, [-1.0] * 3, [-1.0] * 3, [2.0] * 3]))
    far = torch.tensor([[[50.0, 50.0]]])
    assert torch.equal(route(far, out[:, :1], keys, values, radii_), out[:, :1])


def test_query_inside_is_replaced_outside_is_deferred_on_the_model(tiny):
    model, tok = tiny
    base = logits(model, tok, UNRELATED)
    edit = grace().edit(model, tok, A)
    (entry,) = edit.entries
    assert entry.radius == 1.0 and entry.label == tuple(tok(" is Rome", add_special_tokens=False)["input_ids"])
    for prompt in UNRELATED:
        assert torch.dist(query(model, tok, prompt), entry.key) > entry.radius, "the test needs far prompts"
    with edit.applied(model):
        torch.testing.assert_close(layer_output(model, tok, A["prompt"]), entry.value, rtol=0, atol=0)
        assert torch.equal(logits(model, tok, UNRELATED), base)  # deferred: the base model, bit for bit
    assert hooks(model) == 0


# --------------------------------------------------------------------------- maintenance


def official_maintenance(queries, labels, hp: GRACEHparams):
    """The official GRACEAdapter's iteration-0 branch (Thartvigsen/GRACE grace/editors/grace.py),
    transcribed: lists of keys, epsilons and labels; returns them and the trained entry per query."""
    keys, eps, labs, trained = [], [], [], []
    for q, y in zip(queries, labels):
        if not keys:
            keys.append(q), eps.append(hp.eps_init), labs.append(y)
            trained.append(len(keys) - 1)
            continue
        dists = torch.cdist(torch.stack(keys), q[None], p=2).view(-1)
        d, near = dists.min(0)
        d, near = float(d), int(near)
        if d > hp.eps_init + eps[near]:
            keys.append(q), eps.append(hp.eps_init), labs.append(y)
            trained.append(len(keys) - 1)
        elif labs[near] != y:
            keys.append(q), eps.append(hp.eps_init), labs.append(y)
            eps[near] = d / 2 - 1e-5
            eps[-1] = d / 2
            trained.append(len(keys) - 1)
        else:
            if d > eps[near]:
                if hp.eps_expand == "coverage":
                    eps[near] = d
                else:
                    keys[near] = 0.5 * keys[near] + 0.5 * q
                    eps[near] = d
            trained.append(near)
    return keys, eps, labs, trained


@pytest.mark.parametrize("expand", ["coverage", "moving_average"])
def test_maintenance_follows_the_official_code(expand):
    hp = GRACEHparams(eps_init=1.0, eps_expand=expand)
    g = torch.Generator().manual_seed(0)
    queries = list(torch.rand(60, 2, generator=g) * 4)
    labels = [(int(i),) for i in torch.randint(0, 3, (60,), generator=g)]
    keys, eps, labs, trained = official_maintenance(queries, labels, hp)
    book, got = Codebook(), []
    for i, (q, y) in enumerate(zip(queries, labels)):
        got.append(maintain(book, ("e", i), q, torch.zeros(3), y, hp))
    refs = list(book.entries)
    assert [refs.index(r) for r in got] == trained
    entries = list(book.entries.values())
    assert [e.label for e in entries] == labs
    torch.testing.assert_close(torch.stack([e.key for e in entries]), torch.stack(keys))
    # the official cdist uses the matrix-product form past 25 keys: distances agree to ~1e-6
    assert [e.radius for e in entries] == pytest.approx(eps, abs=1e-5)
    adds = len(entries)
    assert 1 < adds < 60, "the stream must exercise add, split and expand"


def test_maintenance_cases():
    hp = GRACEHparams(eps_init=1.0)
    book = Codebook()
    assert maintain(book, ("a", 0), torch.tensor([0.0, 0.0]), torch.zeros(1), (1,), hp) == ("a", 0)
    assert maintain(book, ("b", 0), torch.tensor([3.0, 0.0]), torch.zeros(1), (2,), hp) == ("b", 0)  # add
    assert maintain(book, ("c", 0), torch.tensor([0.0, 1.5]), torch.zeros(1), (1,), hp) == ("a", 0)  # expand
    assert book.entries[("a", 0)].radius == pytest.approx(1.5) and ("c", 0) not in book.entries
    assert maintain(book, ("d", 0), torch.tensor([0.0, -1.0]), torch.zeros(1), (3,), hp) == ("d", 0)  # split
    assert book.entries[("a", 0)].radius == pytest.approx(0.5 - SPLIT_MARGIN)
    assert book.entries[("d", 0)].radius == pytest.approx(0.5)


# --------------------------------------------------------------------------- sequence state


def test_three_edits_share_one_hook_and_restore_exactly(tiny):
    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [A["prompt"], B["prompt"], C["prompt"], *UNRELATED]
    base, n_hooks = logits(model, tok, prompts), hooks(model)
    editor, applied = grace(), []
    try:
        for req in (A, B, C):
            edit = editor.edit(model, tok, req, history=applied)
            edit.apply(model)
            applied.append(edit)
        assert hooks(model) == n_hooks + 1 and len(radii(model)) == 3
        assert not torch.equal(logits(model, tok, prompts)[:3], base[:3])
    finally:
        while applied:
            applied.pop().restore(model)
            assert len(radii(model)) == len(applied)
    assert hooks(model) == n_hooks and model.get_submodule(MODULE).__dict__.get(Adaptor.ATTR) is None
    assert torch.equal(logits(model, tok, prompts), base)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_restore_out_of_order_is_refused(tiny):
    model, tok = tiny
    editor = grace()
    first = editor.edit(model, tok, A)
    first.apply(model)
    try:
        second = editor.edit(model, tok, B, history=[first])
        second.apply(model)
        with pytest.raises(EditStateError):
            first.restore(model)
        second.restore(model)
    finally:
        first.restore(model)
    assert hooks(model) == 0


def test_split_is_recorded_by_the_later_edit_and_undone_with_it(tiny):
    model, tok = tiny
    d = float(torch.dist(query(model, tok, A["prompt"]), query(model, tok, B["prompt"])))
    editor = grace(eps_init=0.75 * d)  # the balls overlap: a different label splits them
    first = editor.edit(model, tok, A)
    with first.applied(model):
        alone = logits(model, tok, [A["prompt"], B["prompt"]])
        second = editor.edit(model, tok, B, history=[first])
        assert len(second.entries) == 1 and list(second.overrides) == [(first.uid, 0)]
        assert first.entries[0].radius == pytest.approx(0.75 * d)  # the earlier edit is not changed
        with second.applied(model):
            assert radii(model) == pytest.approx([d / 2 - SPLIT_MARGIN, d / 2], abs=1e-5)
        assert radii(model) == [0.75 * d]  # undoing the last edit restores the earlier radius
        assert torch.equal(logits(model, tok, [A["prompt"], B["prompt"]]), alone)
    with pytest.raises(EditMismatchError):  # its override needs the first edit applied
        second.apply(model)
    assert hooks(model) == 0


def test_same_label_expands_and_retrains_the_earlier_value(tiny):
    model, tok = tiny
    d = float(torch.dist(query(model, tok, A["prompt"]), query(model, tok, B["prompt"])))
    editor = grace(eps_init=0.75 * d)
    first = editor.edit(model, tok, A)
    with first.applied(model):
        second = editor.edit(model, tok, {**B, "target_new": A["target_new"]}, history=[first])
        assert second.entries == []
        (new,) = second.overrides.values()
        assert new.radius == pytest.approx(d, rel=1e-5) and not torch.equal(new.value, first.entries[0].value)
        with second.applied(model):
            assert radii(model) == [new.radius]
        assert radii(model) == [0.75 * d]


def test_edit_is_a_function_of_its_arguments(tiny):
    model, tok = tiny
    editor = grace()
    one, two = editor.edit(model, tok, [A, B]), editor.edit(model, tok, [A, B])
    for x, y in zip(one.entries, two.entries):
        assert torch.equal(x.key, y.key) and torch.equal(x.value, y.value) and x.radius == y.radius


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_with_overrides(tiny, tmp_path):
    model, tok = tiny
    d = float(torch.dist(query(model, tok, A["prompt"]), query(model, tok, B["prompt"])))
    editor = grace(eps_init=0.75 * d)
    stack = EditStack([editor.edit(model, tok, A)])
    with stack.applied(model):
        stack.push(editor.edit(model, tok, B, history=stack), model)
        want = logits(model, tok, [A["prompt"], B["prompt"], *UNRELATED])
    loaded = Edit.load(stack.save(tmp_path / "stack.safetensors"), model=model)
    assert isinstance(loaded.edits[1], GRACEEdit) and list(loaded.edits[1].overrides) == list(stack.edits[1].overrides)
    with loaded.applied(model):
        assert torch.equal(logits(model, tok, [A["prompt"], B["prompt"], *UNRELATED]), want)
    assert hooks(model) == 0
    other, _ = tiny_model("llama", 1, initializer_range=0.2)
    path = stack.edits[0].save(tmp_path / "one.safetensors")
    with pytest.raises(EditMismatchError):
        Edit.load(path, model=other)


def test_sequential_run_resumes_from_a_checkpoint(tiny, tmp_path):
    """``evaluate``'s checkpoint holds a stack of GRACE edits: a run stopped after 2 edits (the
    second splits the first's entry) resumes from the file, and its third edit, made on the
    loaded codebook, and its scores are those of a run never stopped."""
    from kedit.eval import evaluate

    model, tok = tiny
    d = float(torch.dist(query(model, tok, A["prompt"]), query(model, tok, B["prompt"])))
    reqs = [A, B, C]
    kw = dict(mode="sequential", generation=False, fluency=False, perplexity=False, progress=False)
    whole = evaluate(model, tok, grace(eps_init=0.75 * d), reqs, **kw)
    stopping, calls = grace(eps_init=0.75 * d), []
    real = stopping.edit

    def edit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    stopping.edit = edit
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, stopping, reqs, checkpoint=tmp_path, checkpoint_every=1, **kw)
    assert hooks(model) == 0
    assert len(Edit.load(tmp_path / "stack-2.safetensors", model=model).edits[1].overrides) == 1  # the split
    resumed = evaluate(model, tok, grace(eps_init=0.75 * d), reqs, checkpoint=tmp_path, checkpoint_every=1, **kw)
    assert resumed.meta["resumed_at"] == 2 and len(resumed.meta["edit_seconds"]) == 3
    for a, b in zip(whole.per_request, resumed.per_request):
        assert b["post"] == pytest.approx(a["post"], rel=0, abs=0, nan_ok=True)


def test_load_names_a_bad_field(tiny, tmp_path):
    model, tok = tiny
    edit = grace().edit(model, tok, A)
    tensors, meta = edit.state()
    with pytest.raises(ValueError, match="meta.labels"):
        GRACEEdit.from_state(tensors, {**meta, "labels": [[]]})
    with pytest.raises(ValueError, match="'radii'"):
        GRACEEdit.from_state({**tensors, "radii": torch.tensor([float("nan")], dtype=torch.float64)}, meta)
    assert isinstance(GRACEEdit.from_state(tensors, meta), GRACEEdit)


def test_value_training_replays_the_blocks_below(tiny, monkeypatch):
    """The blocks under the GRACE layer run once per value, not once per step; the trained value
    is that of the plain loop (every block every step, the model's own loss)."""
    import kedit.editors.grace as g
    from kedit.data.encode import model_inputs
    from kedit.hooks import Replay

    model, tok = tiny
    fast = grace().edit(model, tok, [A])

    class NoReplay(Replay):
        def __init__(self, model, names):
            super().__init__(model, [])

    monkeypatch.setattr(g, "Replay", NoReplay)
    monkeypatch.setattr(g, "target_nll", lambda m, b: m(**model_inputs(b)).loss)
    plain = grace().edit(model, tok, [A])
    torch.testing.assert_close(fast.entries[0].value, plain.entries[0].value, rtol=1e-4, atol=1e-4)

"""WISE on tiny models: routing, shards, merges, the sequence state in the edits, save/load.

The contract suite (tests/test_contract.py -k wise) covers purity, efficacy and exact restore on
three families; these tests check what is specific to WISE.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_state_equal
from contract_settings import PAPER
from kedit.data import encode
from kedit.editors import Edit, EditMismatchError, EditStack, editor
from kedit.editors.base import EditStateError
from kedit.editors.wise import ROUTER_ATTR, WISEEdit, Router, act_distance, shard_mask, side_output, ties_merge
from kedit.testing import tiny_model

REQUESTS = [
    {"prompt": "The capital city of France", "subject": "France", "target_new": "is Rome"},
    {"prompt": "The sport of Michael Jordan", "subject": "Michael Jordan", "target_new": "is soccer"},
    {"prompt": "The city of the Eiffel Tower", "subject": "the Eiffel Tower", "target_new": "is Berlin"},
]
UNRELATED = "A quick brown fox jumps over the lazy dog"


def tiny(family: str = "llama"):
    return tiny_model(family, 0, initializer_range=0.2)


def wise(**overrides):
    return editor("wise", **{**PAPER["wise"], **overrides})


def logits(model, tok, prompts):
    batch = encode(tok, prompts)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def memory_snapshot(router: Router) -> dict:
    m = router.memory
    return {"current": m.current.clone(), "shards": [s.clone() for s in m.shards],
            "merged": None if m.merged is None else m.merged.clone(), "epsilon": m.epsilon, "n": m.n}


def assert_memory_equal(router: Router, snap: dict) -> None:
    m = router.memory
    assert torch.equal(m.current, snap["current"])
    assert len(m.shards) == len(snap["shards"]) and all(torch.equal(a, b) for a, b in zip(m.shards, snap["shards"]))
    assert (m.merged is None) == (snap["merged"] is None)
    if m.merged is not None:
        assert torch.equal(m.merged, snap["merged"])
    assert (m.epsilon, m.n) == (snap["epsilon"], snap["n"])


@pytest.fixture(scope="module")
def sequence():
    """Three sequential edits, a shard each and a merge every two: save, save + merge, new shard."""
    model, tok = tiny()
    base = state(model)
    ed = wise(save_freq=1, merge_freq=2)
    stack = EditStack()
    for req in REQUESTS:
        stack.push(ed.edit(model, tok, req, history=stack))  # from the history, on the unedited model
    return model, tok, ed, stack, base


def test_base_weights_untouched_and_router_choice():
    """While applied the base weights are those of the base model; an unrelated prompt gets the base
    model's logits bit for bit (main memory), the edit prompt the side memory's.

    On tiny llama only: the random tiny gpt2 and gpt_neox give some unrelated prompts a larger
    activation margin than the edit's own (no trained features to separate them)."""
    model, tok = tiny()
    base = state(model)
    before = logits(model, tok, [REQUESTS[0]["prompt"], UNRELATED])
    edit = wise().edit(model, tok, REQUESTS[0])
    with edit.applied(model):
        assert_state_equal(model, base)
        after = logits(model, tok, [REQUESTS[0]["prompt"], UNRELATED])
        alone = logits(model, tok, [UNRELATED])
    assert_state_equal(model, base)
    assert not hasattr(model.get_submodule(edit.module), ROUTER_ATTR)
    n = encode(tok, [UNRELATED])["input_ids"].shape[1]
    assert torch.equal(after[1, :n], before[1, :n]), "the unrelated row did not keep the main memory's output"
    assert torch.equal(alone, before[1:, :n])
    assert not torch.allclose(after[0], before[0]), "the edit prompt was not routed to the side memory"


def test_router_scores_route_per_row():
    """The router's decision is the paper's: the edit prompt's score exceeds act_ratio · ε, the
    unrelated prompt's does not."""
    model, tok = tiny()
    edit = wise().edit(model, tok, REQUESTS[0])
    with edit.applied(model):
        router = Router.of(model, edit.module)
        module, seen = router.module, {}
        handle = module.register_forward_hook(lambda _m, args, out: seen.update(a=args[0], out=out), prepend=True)
        batch = encode(tok, [REQUESTS[0]["prompt"], UNRELATED])
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        side = side_output(router.arch, module, seen["a"], router.memory.current)
        score = act_distance(router.act, seen["out"], side, batch["attention_mask"].bool(), infer=True)
        threshold = edit.act_ratio * router.memory.epsilon
        assert router.memory.epsilon == edit.score
    assert score[0] > threshold > score[1]


def test_long_inputs_score_by_the_max_unless_max_score_tokens_is_none():
    """Past ``max_score_tokens`` tokens the inference score is the max over tokens (EasyEdit), with
    None always the mean; the router reads the rule from the last applied edit."""
    act = torch.nn.functional.silu
    main, side = torch.zeros(1, 6, 4), torch.zeros(1, 6, 4)
    side[0, 2] = 3.0  # one token differs
    valid = torch.ones(1, 6, dtype=torch.bool)
    one = torch.linalg.vector_norm(act(side[0, 2]) - act(main[0, 2]))
    torch.testing.assert_close(act_distance(act, main, side, valid, infer=True, max_tokens=5)[0], one)
    torch.testing.assert_close(act_distance(act, main, side, valid, infer=True, max_tokens=None)[0], one / 6)
    torch.testing.assert_close(act_distance(act, main, side, valid, infer=False, max_tokens=5)[0], one / 6)

    model, tok = tiny()
    long = " ".join([UNRELATED] * 3)  # past 5 tokens
    before = logits(model, tok, [long])
    for rule in (5, None):
        edit = wise(max_score_tokens=rule).edit(model, tok, REQUESTS[0])
        assert edit.max_score_tokens == rule
        with edit.applied(model):
            router, seen = Router.of(model, edit.module), {}
            handle = router.module.register_forward_hook(lambda _m, args, out: seen.update(a=args[0], out=out),
                                                         prepend=True)
            after = logits(model, tok, [long])
            handle.remove()
            side_out = side_output(router.arch, router.module, seen["a"], router.memory.current)
            valid = torch.ones(seen["a"].shape[:2], dtype=torch.bool)
            score = act_distance(router.act, seen["out"], side_out, valid, infer=True, max_tokens=rule)[0]
            routed = bool(score > edit.act_ratio * router.memory.epsilon)
        # the router decided by the edit's rule: the main memory's logits bit for bit unless routed
        assert torch.equal(after, before) == (not routed), (rule, float(score))
        if rule is None:
            assert score == act_distance(router.act, seen["out"], side_out, valid)[0]  # the training mean


def test_shard_masks_are_random_bernoulli_and_seeded():
    shape = (64, 256)
    m0, m1 = shard_mask(shape, 0, 0, 0.2), shard_mask(shape, 0, 1, 0.2)
    n = m0.numel()
    assert abs(m0.sum().item() / n - 0.2) < 0.02 and abs(m1.sum().item() / n - 0.2) < 0.02
    # independent masks overlap on about ρ² of the entries (Theorem 2.1), not on ρ
    assert abs((m0 & m1).sum().item() / n - 0.04) < 0.01
    assert torch.equal(shard_mask(shape, 0, 1, 0.2), m1) and not torch.equal(m0, m1)
    assert torch.equal(shard_mask(shape, 7, 0, 0.2), shard_mask(shape, 6, 1, 0.2))  # seed + shard


def test_edit_changes_only_its_shard(sequence):
    """Each edit trains its shard inside its mask; after a save the next shard starts from W_v."""
    model, _tok, _ed, stack, _base = sequence
    first = stack.edits[0]
    with first.applied(model):
        router = Router.of(model, first.module)
        W_v = dict(model.named_parameters())[first.weight].detach()
        shard = router.memory.shards[0]
        mask = first.mask()
        assert torch.equal(shard[~mask], W_v[~mask])
        assert not torch.equal(shard[mask], W_v[mask])
        assert (shard - W_v).abs().max() <= 1.0  # the W_v ± c box
        assert torch.equal(router.memory.current, W_v)  # saved: the next shard starts from W_v


def test_save_and_merge_at_the_configured_counts(sequence):
    _model, _tok, _ed, stack, _base = sequence
    assert [e.position for e in stack.edits] == [0, 1, 2]
    assert [e.shard for e in stack.edits] == [0, 1, 2]
    assert all(e.saves for e in stack.edits)
    assert [e.merged is not None for e in stack.edits] == [False, True, False]
    model, tok = tiny()
    ed = wise(save_freq=2, merge_freq=4)
    edits = []
    for req in (REQUESTS * 2)[:5]:
        edits.append(ed.edit(model, tok, req, history=edits))
    assert [e.shard for e in edits] == [0, 0, 1, 1, 2]
    assert [e.saves for e in edits] == [False, True, False, True, False]
    assert [e.merged is not None for e in edits] == [False, False, False, True, False]


def test_ties_merge():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.1])
    b = torch.tensor([3.0, 2.0, -1.0, 0.2])
    # density 1: sign election by the weighted sum, then the mean over the agreeing entries
    got = ties_merge(base, [a, b], [0.5, 0.5], density=1.0)
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0, 3.0, 0.15]))
    # density 0.5 keeps the top 2 entries of each change by magnitude: a -> [0,-2,3,0], b -> [3,2,0,0]
    got = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 3.0, 0.0]))


def test_stack_and_restore_in_reverse_is_exact(sequence):
    model, tok, _ed, stack, base = sequence
    hooks = (len(model._forward_pre_hooks), sum(len(m._forward_hooks) for m in model.modules()))
    snaps, outs = [], []
    for edit in stack.edits:
        edit.apply(model)
        router = Router.of(model, edit.module)
        snaps.append(memory_snapshot(router))
        outs.append(logits(model, tok, [r["prompt"] for r in REQUESTS] + [UNRELATED]))
    assert router.memory.merged is not None and router.memory.n == 3
    with pytest.raises(EditStateError):
        stack.edits[0].restore(model)  # out of order
    for i in reversed(range(len(stack.edits))):
        assert_memory_equal(router, snaps[i])
        torch.testing.assert_close(logits(model, tok, [r["prompt"] for r in REQUESTS] + [UNRELATED]), outs[i],
                                   rtol=0, atol=0)
        stack.edits[i].restore(model)
    assert_state_equal(model, base)
    assert (len(model._forward_pre_hooks), sum(len(m._forward_hooks) for m in model.modules())) == hooks
    assert not hasattr(router.module, ROUTER_ATTR)
    with pytest.raises(EditMismatchError):
        stack.edits[1].apply(model)  # needs the first edit below it
    assert not hasattr(router.module, ROUTER_ATTR)


def test_state_comes_from_history_not_the_editor(sequence, monkeypatch):
    """The same history gives the same edit, whether passed as ``history`` on the unedited model or
    read from the model's router with the stack applied; the editor object is unchanged. With the
    stack applied, training does not run the router (the training hook replaces its output)."""
    model, tok, ed, stack, base = sequence
    before = dict(vars(ed))
    from_history = ed.edit(model, tok, REQUESTS[0], history=stack)
    scored, scores = [], Router.scores
    monkeypatch.setattr(Router, "scores", lambda self, *a: scored.append(1) or scores(self, *a))
    with stack.applied(model):
        from_model = ed.edit(model, tok, REQUESTS[0])
        assert not scored
        logits(model, tok, [UNRELATED])
        assert scored  # and the applied stack routes again after the edit
    assert vars(ed) == before
    assert from_history.position == from_model.position == 3
    assert torch.equal(from_history.values, from_model.values) and from_history.score == from_model.score
    assert_state_equal(model, base)


def test_save_load_round_trip(sequence, tmp_path):
    model, tok, _ed, stack, base = sequence
    path = stack.save(tmp_path / "wise.safetensors")
    loaded = Edit.load(path, model=model)
    assert [type(e) for e in loaded.edits] == [WISEEdit] * 3 and loaded.edits[1].merged is not None
    assert [e.max_score_tokens for e in loaded.edits] == [e.max_score_tokens for e in stack.edits]
    prompts = [r["prompt"] for r in REQUESTS] + [UNRELATED]
    with stack.applied(model):
        want = logits(model, tok, prompts)
    with loaded.applied(model):
        got = logits(model, tok, prompts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert_state_equal(model, base)
    other, _ = tiny_model("llama", 1, initializer_range=0.2)
    with pytest.raises(EditMismatchError):
        Edit.load(path, model=other)


def test_side_memory_training_replays_the_blocks_below(monkeypatch):
    """The blocks under the WISE layer run once per edit, not once per step; the side memory is
    bit-identical to the plain loop's (every block every step)."""
    import kedit.editors.wise as w
    from kedit.hooks import Replay

    model, tok = tiny()
    fast = wise().edit(model, tok, REQUESTS[0])

    class NoReplay(Replay):
        def __init__(self, model, names):
            super().__init__(model, [])

    monkeypatch.setattr(w, "Replay", NoReplay)
    plain = wise().edit(model, tok, REQUESTS[0])
    assert torch.equal(fast.values, plain.values) and fast.info["steps"] == plain.info["steps"]

"""kedit.hooks.trace: read and replace module inputs/outputs, stop early, leave no hooks."""

from __future__ import annotations

import pytest
import torch

from kedit.hooks import StopForward, run_until, skip, trace
from kedit.models import arch_of, get_module
from kedit.testing import tiny_model


@pytest.fixture(scope="module")
def llama():
    model, tok = tiny_model("llama")
    batch = tok(["The capital of France is", "Rome"], return_tensors="pt", padding=True)
    return model, batch


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_reads_inputs_and_outputs(llama):
    model, batch = llama
    arch = arch_of(model)
    down, block = arch.mlp_out_module(1), arch.block(1)
    with torch.no_grad(), trace(model, [down, block], inputs=True) as t:
        model(**batch)
    b, s = batch["input_ids"].shape
    d_in, d_out = arch.mlp_dims(model, 1)
    assert t[down].input.shape == (b, s, d_in) and t[down].output.shape == (b, s, d_out)
    with torch.no_grad():  # the recorded output is what the module makes of the recorded input
        torch.testing.assert_close(get_module(model, down)(t[down].input), t[down].output)
    # blocks: the (first) tensor of whatever they return; their input comes as a keyword or not
    assert t[block].input.shape == t[block].output.shape == (b, s, model.config.hidden_size)
    assert no_hooks(model)


def test_outputs_only_by_default(llama):
    model, batch = llama
    name = arch_of(model).mlp_out_module(0)
    with torch.no_grad(), trace(model, name) as t:  # a single name is fine
        model(**batch)
    assert t[name].input is None and t[name].output is not None


def test_detach(llama):
    model, batch = llama
    name = arch_of(model).mlp_out_module(0)
    with trace(model, [name], detach=True) as t:
        model(**batch)
    assert not t[name].output.requires_grad
    with trace(model, [name]) as t:
        model(**batch)
    assert t[name].output.requires_grad


def test_replace_output(llama):
    model, batch = llama
    arch = arch_of(model)
    name = arch.mlp_out_module(2)
    base = logits(model, batch)
    with torch.no_grad(), trace(model, [name], edit_output=lambda n, y: y.clone()):
        same = model(**batch).logits
    torch.testing.assert_close(same, base)
    with torch.no_grad(), trace(model, [name], edit_output=lambda n, y: torch.zeros_like(y)) as t:
        zeroed = model(**batch).logits
    assert torch.count_nonzero(t[name].output) == 0  # the recorded value is the replaced one
    assert not torch.allclose(zeroed, base)
    # same as zeroing the MLP by hand
    mlp = get_module(model, name)
    with torch.no_grad():
        saved = mlp.weight.clone()
        mlp.weight.zero_()
        try:
            manual = model(**batch).logits
        finally:
            mlp.weight.copy_(saved)
    torch.testing.assert_close(zeroed, manual)
    torch.testing.assert_close(logits(model, batch), base)  # nothing left behind
    assert no_hooks(model)


def test_replace_block_output_tuple_or_tensor(llama):
    """Replacing a block's output keeps the rest of whatever structure the block returns."""
    model, batch = llama
    block = arch_of(model).block(0)
    base = logits(model, batch)
    with torch.no_grad(), trace(model, [block], edit_output=lambda n, y: y * 1.0):
        torch.testing.assert_close(model(**batch).logits, base)
    with torch.no_grad(), trace(model, [block], edit_output=lambda n, y: y + 1.0):
        assert not torch.allclose(model(**batch).logits, base)


def test_replace_input(llama):
    model, batch = llama
    name = arch_of(model).mlp_out_module(1)
    seen = []

    def edit(n, x):
        seen.append(n)
        return torch.zeros_like(x)

    with torch.no_grad(), trace(model, [name], inputs=True, edit_input=edit) as t:
        model(**batch)
    assert seen == [name]
    assert torch.count_nonzero(t[name].input) == 0
    assert torch.count_nonzero(t[name].output) == 0  # down_proj has no bias: W 0 = 0
    assert no_hooks(model)


def test_stop_aborts_forward(llama):
    model, batch = llama
    arch = arch_of(model)
    stop = arch.block(0)
    calls = []
    above = [get_module(model, arch.block(i)) for i in (1, 2)] + [get_module(model, arch.lm_head)]
    handles = [m.register_forward_pre_hook(lambda *a, m=m: calls.append(m)) for m in above]
    try:
        with torch.no_grad(), trace(model, [arch.mlp_out_module(0)], stop=stop) as t:
            assert run_until(model, **batch) is None
        assert calls == []  # nothing above the stop module ran
        assert t[stop].output.shape[:2] == batch["input_ids"].shape  # its output is still recorded
        assert t[arch.mlp_out_module(0)].output is not None
        with torch.no_grad(), trace(model, [stop], stop=stop), pytest.raises(StopForward):
            model(**batch)  # without run_until the StopForward propagates
        assert run_until(model, **batch) is not None  # no trace: a normal forward
        assert len(calls) == 3
    finally:
        for h in handles:
            h.remove()
    assert no_hooks(model)


def test_no_hooks_left_after_exception(llama):
    model, batch = llama
    arch = arch_of(model)
    names = [arch.mlp_out_module(i) for i in range(3)] + [arch.block(1)]
    with pytest.raises(RuntimeError, match="boom"):
        with trace(model, names, inputs=True, edit_output=lambda n, y: y, stop=arch.block(2)):
            assert not no_hooks(model)
            raise RuntimeError("boom")
    assert no_hooks(model)

    def bad_edit(name, y):
        raise ValueError(f"bad edit at {name}")

    with pytest.raises(ValueError, match="bad edit"), trace(model, names, edit_output=bad_edit):
        model(**batch)  # an exception inside a hook, during the forward
    assert no_hooks(model)


def test_unknown_module(llama):
    model, _ = llama
    with pytest.raises(KeyError, match="no module"):
        with trace(model, ["model.layers.99.mlp"]):
            pass
    with pytest.raises(KeyError, match="nope"):
        with trace(model, [arch_of(model).block(0)], stop="nope"):
            pass
    assert no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_trace_other_families(family):
    """Conv1D (GPT-2) and encoder-decoder (T5): the MLP key has d_in features."""
    model, tok = tiny_model(family)
    arch = arch_of(model)
    name = arch.mlp_out_module(0)
    batch = tok(["The capital of France is"], return_tensors="pt")
    if arch.encoder_decoder:
        batch["decoder_input_ids"] = batch["input_ids"][:, :4]
    with torch.no_grad(), trace(model, [name], inputs=True) as t:
        model(**batch)
    assert t[name].input.shape[-1] == arch.mlp_dims(model, 0)[0]
    assert t[name].output.shape[-1] == arch.mlp_dims(model, 0)[1]
    assert no_hooks(model)


def test_keyword_and_no_inputs():
    """A module called with keyword arguments only (input read and replaced), or with none."""

    class Inner(torch.nn.Module):
        def forward(self, hidden=None, scale=1.0):
            return torch.ones(2) if hidden is None else hidden * scale

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.kw, self.none = Inner(), Inner()

        def forward(self, x):
            return self.kw(hidden=x, scale=2.0) + self.none()

    model, x = Outer(), torch.tensor([1.0, 3.0])
    with trace(model, ["kw", "none"], inputs=True, edit_input=lambda n, h: h + 1) as t:
        y = model(x)
    assert torch.equal(t["kw"].input, x + 1) and t["none"].input is None
    assert torch.equal(y, (x + 1) * 2 + 1)
    assert no_hooks(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skip_replays_the_lowest_blocks(family):
    """``skip``: with block 1's recorded output replayed, blocks 0 and 1 do not run (their hooks do)
    and the logits are those of the full forward; outside the block the model runs again."""
    model, tok = tiny_model(family)
    batch = {k: v for k, v in tok(["The capital of France is"], return_tensors="pt").items()
             if k != "token_type_ids"}
    arch = arch_of(model)
    blocks = [arch.block(0), arch.block(1)]
    with torch.no_grad(), trace(model, blocks[-1:], detach=True) as rec:
        full = model(**batch).logits
    assert not rec[blocks[-1]].in_tuple
    ran = []
    handle = get_module(model, arch.mlp_out_module(0)).register_forward_hook(lambda *a: ran.append(1))
    try:
        with torch.no_grad(), skip(model, blocks, rec[blocks[-1]].output), trace(model, blocks) as seen:
            replayed = model(**batch).logits
        assert not ran  # block 0's MLP did not run
        assert seen[blocks[0]].output is not None and torch.equal(seen[blocks[1]].output, rec[blocks[-1]].output)
        torch.testing.assert_close(replayed, full, rtol=0, atol=0)
        with torch.no_grad():
            model(**batch)
        assert ran  # restored
    finally:
        handle.remove()
    assert all("forward" not in get_module(model, b).__dict__ for b in blocks)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replay_records_then_skips_the_blocks_below(family):
    """``Replay``: the first pass records the output of the blocks under a module
    (``Arch.blocks_below``), later passes skip them and give the same logits."""
    from kedit.hooks import Replay

    model, tok = tiny_model(family)
    batch = {k: v for k, v in tok(["The capital of France is"], return_tensors="pt").items()
             if k != "token_type_ids"}
    arch = arch_of(model)
    below = arch.blocks_below(model, arch.mlp_out_module(2))
    assert below == [arch.block(0), arch.block(1)]
    assert arch.blocks_below(model, arch.block(1)) == [arch.block(0)] and arch.blocks_below(model, "lm_head") == []
    replay, ran = Replay(model, below), []
    handle = get_module(model, arch.mlp_out_module(0)).register_forward_hook(lambda *a: ran.append(1))
    try:
        with torch.no_grad():
            with replay():
                first = model(**batch).logits
            assert len(ran) == 1 and replay.output is not None
            with replay():
                second = model(**batch).logits
        assert len(ran) == 1  # block 0 did not run again
        torch.testing.assert_close(second, first, rtol=0, atol=0)
    finally:
        handle.remove()
    assert no_hooks(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_target_nll_is_the_models_own_loss(family):
    """``target_nll`` (logits only where the targets are) equals the model's own LM loss."""
    from kedit.data.encode import encode, model_inputs, target_nll

    model, tok = tiny_model(family)
    batch = encode(tok, ["The capital of France is", "A cat"], ["Rome", "sat on the mat"])
    with torch.no_grad():
        torch.testing.assert_close(target_nll(model, batch), model(**model_inputs(batch)).loss)

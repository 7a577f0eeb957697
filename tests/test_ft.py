"""FT-L, FT-M and LoRA specifics (the shared contract is in test_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kedit
from kedit.data import encode
from kedit.data.encode import target_logprobs
from kedit.editors.ft import FTL, FTM, resolve_layers
from kedit.editors.lora import LoRA, build_adapters, merged_factors, target_modules
from kedit.models import arch_of
from kedit.testing import tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REQ = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}


def first_token_logprob(model, tok, req=REQ) -> float:
    batch = encode(tok, [req["prompt"]], [req["target_new"]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    p = batch["prompt_len"][0]
    return torch.log_softmax(logits[0, p - 1], -1)[batch["input_ids"][0, p]].item()


def test_ftl_respects_norm_constraint():
    model, tok = tiny_model("llama")
    edit = FTL(num_steps=8, lr=1e-2, norm_constraint=2e-3).edit(model, tok, REQ)
    (name,) = edit.names
    assert name == arch_of(model).mlp_out_weight(2)  # "auto": 2/3 depth of 3 layers
    d = edit.delta(name)
    assert d.abs().max() <= 2e-3 + 1e-9
    assert d.abs().max() > 1e-3  # it did move, up to the bound
    free = FTM(num_steps=8, lr=1e-2).edit(model, tok, REQ)
    assert free.delta(name).abs().max() > 2e-3


def test_ftl_prompt_last_raises_first_target_token():
    """ROME's FT-L objective scores the target at the last prompt position."""
    model, tok = tiny_model("gpt2")
    edit = FTL(num_steps=5, lr=1e-2, norm_constraint=1e-2, layers=[0, 1]).edit(model, tok, REQ)
    assert edit.info["layers"] == [0, 1] and len(edit.names) == 2
    lp0 = first_token_logprob(model, tok)
    with edit.applied(model):
        assert first_token_logprob(model, tok) > lp0 + 0.1


def test_edit_keeps_training_mode_flags_grads_and_rng():
    model, tok = tiny_model("gpt_neox")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.random.get_rng_state()
    with torch.no_grad():  # editing works even where the caller disabled grad
        for editor in (FTM(num_steps=2), LoRA(num_steps=2)):
            editor.edit(model, tok, REQ)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


def test_lora_is_deterministic_per_seed():
    model, tok = tiny_model("llama")
    a = LoRA(num_steps=3, lr=1e-2, layers="auto").edit(model, tok, REQ)
    b = LoRA(num_steps=3, lr=1e-2, layers="auto").edit(model, tok, REQ)
    c = LoRA(num_steps=3, lr=1e-2, layers="auto", seed=1).edit(model, tok, REQ)
    (name, *_) = a.names
    assert torch.equal(a.delta(name), b.delta(name))
    assert not torch.equal(a.delta(name), c.delta(name))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_merge_matches_peft(family):
    """Our factors give exactly peft's own merged update, in storage orientation (Conv1D too)."""
    from peft import LoraConfig

    model, _ = tiny_model(family)
    arch = arch_of(model)
    modules = target_modules(arch, model, [1], "mlp")
    assert len(modules) == (3 if family == "llama" else 2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["_"], fan_in_fan_out=arch.conv1d)
    _, lora = build_adapters(model, modules, config)
    params = dict(model.named_parameters())
    for name, layer in lora.items():
        torch.nn.init.normal_(layer.lora_B["kedit"].weight)  # peft initializes B to zero
        left, right = merged_factors(layer, arch)
        merged = left @ right.T
        assert merged.shape == params[f"{name}.weight"].shape
        torch.testing.assert_close(merged, layer.get_delta_weight("kedit"))
        x = torch.randn(2, layer.in_features)
        with torch.no_grad():  # the adapter's forward equals the module with the merged weight
            torch.testing.assert_close(layer(x), layer.base_layer(x) + (x @ (merged if arch.conv1d else merged.T)))
        # the proxies share storage with, but are not, the model's parameters
        assert layer.base_layer.weight is not params[f"{name}.weight"]
        assert params[f"{name}.weight"].requires_grad


def test_layers_are_validated():
    model, _ = tiny_model("llama")
    arch = arch_of(model)
    assert resolve_layers("all", arch, model) == [0, 1, 2]
    assert resolve_layers([-1, 0], arch, model) == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([3], arch, model)
    with pytest.raises(ValueError, match="layers must be"):
        resolve_layers("middle", arch, model)


@pytest.mark.parametrize("path", sorted(p for d in ("ft-l", "ft-m", "lora") for p in (CONFIGS / d).glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_configs_parse(path):
    editor = kedit.editor(path.parent.name, config=path)
    assert isinstance(editor.hparams.lr, float) and editor.hparams.num_steps > 0


def test_every_editor_has_configs():
    for name in ("ft-l", "ft-m", "lora"):
        assert {p.stem for p in (CONFIGS / name).glob("*.yaml")} >= {"smollm2-135m", "gpt2", "llama", "gpt_neox"}


@pytest.mark.real_model
def test_ftm_makes_smollm2_say_rome(smollm2):
    model, tok = smollm2
    name = arch_of(model).mlp_out_weight(20)  # "auto" for 30 layers
    w0 = model.get_parameter(name).detach().clone()
    prompt = tok(REQ["prompt"], return_tensors="pt")

    def greedy() -> str:
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
        return tok.decode(out[0, prompt["input_ids"].shape[1]:])

    assert greedy().startswith(" Paris")
    edit = kedit.editor("ft-m", num_steps=15).edit(model, tok, REQ)
    assert edit.names == [name]
    assert torch.equal(model.get_parameter(name), w0)  # edit() is pure
    with edit.applied(model):
        assert greedy().startswith(" Rome")
        batch = encode(tok, [REQ["prompt"]], [REQ["target_new"]])
        with torch.no_grad():
            _, correct, n = target_logprobs(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        assert correct.item() == n.item()
    assert torch.equal(model.get_parameter(name), w0)  # restore is bit-exact
    assert greedy().startswith(" Paris")

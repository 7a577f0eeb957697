"""MEMIT and AlphaEdit: layer spreading, representation, null-space projection, key
accumulation across sequential edits, and MEMIT on SmolLM2-135M (20 requests, one batch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kedit.data.encode import encode, target_logprobs
from kedit.editors import EditStack, WeightDelta
from kedit.editors.alphaedit import AlphaEdit, null_space_projection
from kedit.editors.memit import MEMIT
from kedit.models import arch_of
from conftest import assert_state_equal

REQUESTS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"},
    {"prompt": "Michael Jordan plays", "subject": "Michael Jordan", "target_new": "soccer"},
    {"prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Berlin"},
]


def logprob(model, tok, reqs):
    b = encode(tok, [r["prompt"] for r in reqs], [r["target_new"] for r in reqs])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return target_logprobs(logits, b["labels"])[0]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_memit_multi_layer_paper_path(tiny, family):
    """The paper's path (values at the last layer, residual spread over layers), low rank."""
    model, tok = tiny(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MEMIT.for_contract_tests(model, tok)
    editor.hparams = dataclasses.replace(editor.hparams, layers=[0, 1], edit_aware=False, templates=[(3, 5)])
    edit = editor.edit(model, tok, REQUESTS)
    assert_state_equal(model, state)
    arch = arch_of(model)
    assert edit.names == sorted(arch.mlp_out_weight(i) for i in (0, 1))
    for name in edit.names:  # rank 3 < the dense size: kept low rank, in storage orientation
        left, right = edit.factors[name]
        assert left.shape[1] == right.shape[1] == 3
        assert edit.delta(name).shape == model.get_parameter(name).shape
    assert edit.info["layers"] == [0, 1] and len(edit.info["v_steps"]) == 3
    with edit.applied(model):
        assert torch.isfinite(logprob(model, tok, REQUESTS)).all()
    assert_state_equal(model, state)


def test_memit_dense_when_cheaper(tiny):
    model, tok = tiny("llama")
    editor = MEMIT.for_contract_tests(model, tok)
    # d_in 64, d_out 32: 30 requests of rank 30 cost 30 * 96 > 64 * 32 -> dense
    reqs = [dict(r, target_new=t) for r in REQUESTS for t in ("Rome", "Paris", "Berlin", "soccer", "guitar",
                                                              "Italian", "French", "Shakespeare", "basketball",
                                                              "Hamlet")]
    edit = editor.edit(model, tok, reqs)
    name = arch_of(model).mlp_out_weight(0)
    assert name in edit.dense and name not in edit.factors


def test_default_layers():
    assert MEMIT.default_layers(30) == [4, 5, 6, 7, 8]
    assert MEMIT.default_layers(28) == [3, 4, 5, 6, 7, 8][1:]
    assert MEMIT.default_layers(3) == [0, 1]


def test_null_space_projection():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    C = basis @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 1e-3, 1e-4, 0, 0], dtype=torch.float64)) @ basis.T
    P = null_space_projection(C, 1e-2)
    torch.testing.assert_close(P @ P, P)
    assert round(float(torch.trace(P))) == 4
    torch.testing.assert_close(P @ basis[:, :4], torch.zeros(8, 4, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_alphaedit_update_lives_in_the_null_space(tiny, family):
    """ΔW = R (A⁻¹PK)ᵀ with A⁻¹PK in range(P): ΔW leaves the preserved keys' directions alone."""
    model, tok = tiny(family)
    editor = AlphaEdit.for_contract_tests(model, tok)
    edit = editor.edit(model, tok, REQUESTS)
    arch = arch_of(model)
    name = arch.mlp_out_weight(0)
    P = editor.projections[0]
    dW = arch.as_out_in(edit.delta(name)).double()  # (d_out, d_in)
    assert dW.abs().max() > 0
    torch.testing.assert_close(dW @ P, dW, rtol=1e-4, atol=1e-6)


def test_alphaedit_accumulates_previous_keys(tiny):
    model, tok = tiny("llama")
    editor = AlphaEdit.for_contract_tests(model, tok)
    stack = EditStack()
    e1 = editor.edit(model, tok, REQUESTS[:1])
    kp1 = editor.previous_keys[0].clone()
    assert torch.linalg.matrix_rank(kp1) == 1
    stack.push(e1)
    with stack.applied(model):
        e2 = editor.edit(model, tok, REQUESTS[1:])
    kp2 = editor.previous_keys[0]
    assert torch.linalg.matrix_rank(kp2) == 3 and not torch.equal(kp1, kp2)
    stack.push(e2)
    with stack.applied(model):
        assert (logprob(model, tok, REQUESTS[:1]) > -1e9).all()
    editor.reset()
    assert not editor.previous_keys and not editor.projections
    independent = AlphaEdit.for_contract_tests(model, tok)
    independent.hparams = dataclasses.replace(independent.hparams, accumulate_keys=False)
    independent.edit(model, tok, REQUESTS[:1])
    assert independent.previous_keys[0].abs().max() == 0


@pytest.mark.real_model
def test_smollm2_memit_20_requests_one_batch(smollm2, tmp_path_factory):
    from kedit.data import load_requests

    model, tok = smollm2
    reqs = load_requests("counterfact-sample", limit=20)  # the packaged records and corpus
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MEMIT(stats_tokens=10_000,
                   stats_cache_dir=str(tmp_path_factory.mktemp("stats")))
    edit = editor.edit(model, tok, reqs)
    assert_state_equal(model, state)
    assert isinstance(edit, WeightDelta) and edit.info["layers"] == [4, 5, 6, 7, 8]

    def nll(targets):
        b = encode(tok, [r.prompt for r in reqs], targets)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp, _, n = target_logprobs(logits, b["labels"])
        return -lp / n

    with edit.applied(model):
        es = (nll([r.target_new for r in reqs]) < nll([r.target_true for r in reqs])).float().mean().item()
    assert_state_equal(model, state)
    assert es >= 0.9, f"MEMIT efficacy on 20 requests: {es:.2f}"

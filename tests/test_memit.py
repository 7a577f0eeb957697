"""MEMIT and AlphaEdit: layer spreading, representation, null-space projection, the keys of
previous edits read from the history (and nowhere else), and MEMIT on SmolLM2-135M (20
requests, one batch)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kedit.data.encode import encode, target_logprobs
from kedit.editors import EditStack, WeightDelta
from kedit.editors import Edit
from kedit.editors.alphaedit import AlphaEdit, AlphaEditDelta, null_space_projection
from kedit.editors.locate import context_templates, locate_requests, subject_keys
from kedit.editors.memit import MEMIT
from kedit.editors import values as V
from kedit.models import arch_of
from conftest import assert_state_equal
from contract_settings import contract_editor

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
    editor = contract_editor("memit", model, tok)
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
    editor = contract_editor("memit", model, tok)
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
    editor = contract_editor("alphaedit", model, tok)
    edit = editor.edit(model, tok, REQUESTS)
    arch = arch_of(model)
    name = arch.mlp_out_weight(0)
    P = null_space_projection(editor.second_moments(model, tok, [0])[0], editor.hparams.nullspace_threshold)
    dW = arch.as_out_in(edit.delta(name)).double()  # (d_out, d_in)
    assert dW.abs().max() > 0
    torch.testing.assert_close(dW @ P, dW, rtol=1e-4, atol=1e-6)


def test_alphaedit_single_edits_do_not_depend_on_order(tiny):
    """Single mode (each edit on the unedited model, restored after): one editor object gives a
    request the same edit whatever it edited before. (It used to keep the keys of every edit it
    returned, so results depended on the order of the requests.)"""
    model, tok = tiny("llama")
    editor = contract_editor("alphaedit", model, tok)
    name = arch_of(model).mlp_out_weight(0)

    def single(reqs):
        deltas = []
        for r in reqs:
            edit = editor.edit(model, tok, [r])
            with edit.applied(model):
                pass
            deltas.append(edit.delta(name))
        return deltas

    ab, ba = single(REQUESTS[:2]), single(REQUESTS[1::-1])
    assert not torch.equal(ab[0], ab[1])
    assert torch.equal(ab[0], ba[1]) and torch.equal(ab[1], ba[0])
    fresh = contract_editor("alphaedit", model, tok).edit(model, tok, REQUESTS[:1])
    assert torch.equal(fresh.delta(name), ab[0])


def test_alphaedit_uses_the_keys_of_its_history(tiny, tmp_path):
    """Sequential editing: K_p K_pᵀ is the sum over the AlphaEdit edits in ``history`` of their
    keys, measured with each edit applied (the paper's accumulated keys); the keys survive
    save/load; other edits and ``accumulate_keys=False`` add none; each edit raises P(target) of
    its requests (the second on top of the first)."""
    model, tok = tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p0 = logprob(model, tok, REQUESTS)
    editor = contract_editor("alphaedit", model, tok)
    name = arch_of(model).mlp_out_weight(0)
    reqs = locate_requests(REQUESTS)
    templates = context_templates(model, tok, editor.hparams.templates, editor.hparams.template_seed)

    def prior(history, ed=editor):
        return ed.preserved(model, tok, [0], history)[0][1]

    stack = EditStack()
    e1 = editor.edit(model, tok, REQUESTS[:1])
    assert isinstance(e1, AlphaEditDelta) and e1.keys[name].shape[0] == 1
    with e1.applied(model):  # e1's keys: measured with e1 applied
        assert logprob(model, tok, REQUESTS[:1]) > p0[:1]
        k1 = subject_keys(model, tok, reqs[:1], templates, [0])[0][0].double().T
        e2 = editor.edit(model, tok, REQUESTS[1:], history=[e1])
        alone = editor.edit(model, tok, REQUESTS[1:])
    torch.testing.assert_close(prior([e1]), k1 @ k1.T, rtol=0, atol=0)
    assert torch.linalg.matrix_rank(prior([e1])) == 1 and prior([]).abs().max() == 0
    assert not torch.equal(e2.delta(name), alone.delta(name))  # the history constrains the edit
    stack.push(e1)
    stack.push(e2)
    assert torch.linalg.matrix_rank(prior(stack.edits)) == 3
    loaded = Edit.load(stack.save(tmp_path / "stack.safetensors"))
    assert torch.equal(prior(loaded.edits), prior(stack.edits))
    memit = contract_editor("memit", model, tok).edit(model, tok, REQUESTS[:1])
    assert torch.equal(prior([memit, e1]), prior([e1]))
    independent = contract_editor("alphaedit", model, tok)
    independent.hparams = dataclasses.replace(independent.hparams, accumulate_keys=False)
    assert prior(stack.edits, independent).abs().max() == 0
    with stack.applied(model):  # the second edit, on top of the first
        assert (logprob(model, tok, REQUESTS[1:]) > p0[1:]).all()
    assert_state_equal(model, state)


# --------------------------------------------------------------------------- Norm-Anchor Scaling


def test_anchor_values_bounds_the_value_norm():
    """NAS: ‖v0 + δ'‖ equals the anchor for every kept value (a short one is inflated, a long one
    shrunk); a value beyond skip_factor × anchor writes nothing (δ' = 0)."""
    torch.manual_seed(0)
    v0 = torch.randn(4, 16)
    delta = torch.randn(4, 16)
    delta[0] = -0.9 * v0[0]  # short v*
    delta[3] = 50 * v0[3]  # an outlier
    anchor = 2 * float((v0[1:3] + delta[1:3]).norm(dim=-1).max())
    assert float((v0[0] + delta[0]).norm()) < anchor < 2 * anchor < float((v0[3] + delta[3]).norm())
    new, skipped = V.anchor_values(v0, delta, anchor, skip_factor=2.0)
    assert skipped.tolist() == [False, False, False, True]
    torch.testing.assert_close((v0 + new)[:3].norm(dim=-1), torch.full((3,), anchor))
    assert torch.equal(new[3], torch.zeros(16))
    cos = torch.nn.functional.cosine_similarity(v0 + new, v0 + delta)[:3]  # the direction is kept
    torch.testing.assert_close(cos, torch.ones(3))


def test_trimmed_mean_drops_the_top_five_percent():
    norms = torch.cat([torch.ones(38), torch.tensor([100.0, 1000.0])])  # floor(0.05 · 40) = 2 dropped
    assert V.trimmed_mean(norms) == 1.0
    assert V.trimmed_mean(torch.tensor([1.0, 3.0])) == 2.0  # floor(0.1) = 0 dropped


def nas_editor(name, model, tok, tmp_path, **overrides):
    from contract_settings import paper_editor

    return paper_editor(name, model, tok, norm_anchor=True, anchor_samples=6, anchor_requests="counterfact-sample",
                        stats_cache_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memit_norm_anchor_sets_the_mlp_value_norm(tiny, family, tmp_path):
    """With NAS the target of each request asks the last edited MLP for a value of the anchor's
    norm: ‖z − h + v0‖ = anchor (h: the block's output, v0: the MLP's output, bare prompt)."""
    model, tok = tiny(family)
    editor = nas_editor("memit", model, tok, tmp_path)
    layer = editor.layers(model)[-1]
    reqs = locate_requests(REQUESTS)
    templates = context_templates(model, tok, editor.hparams.templates, editor.hparams.template_seed)
    anchor = editor.anchor(model, tok, layer, ())
    assert anchor > 0 and (tmp_path / "anchors").is_dir()  # cached on disk
    z, vals = editor.target_states(model, tok, reqs, templates, layer, anchor=anchor)
    h = subject_keys(model, tok, reqs, templates, [layer], z_layer=layer)[1].double()
    v0 = V.mlp_outputs(model, tok, reqs, layer).double()
    norms = (z - h + v0).norm(dim=-1)
    for i, norm in enumerate(norms.tolist()):
        if i in vals.skipped:
            assert torch.allclose(z[i], h[i], atol=1e-5)
        else:
            assert norm == pytest.approx(anchor, rel=1e-4)
    edit = editor.edit(model, tok, REQUESTS)
    assert edit.info["nas_anchor"] == anchor and isinstance(edit.info["nas_skipped"], list)


def test_norm_anchor_is_measured_on_the_unedited_model(tiny, tmp_path):
    """The anchor with edits applied (history) is the anchor of the model before them."""
    model, tok = tiny("llama")
    editor = nas_editor("alphaedit", model, tok, tmp_path / "a")
    layer = editor.layers(model)[-1]
    clean = editor.anchor(model, tok, layer, ())
    edit = editor.edit(model, tok, REQUESTS[:1])
    assert edit.info["nas_anchor"] == clean
    V._ANCHORS.clear()  # no memo, another disk cache: measured again, with the edit applied
    other = nas_editor("alphaedit", model, tok, tmp_path / "b")
    with edit.applied(model):
        assert other.anchor(model, tok, layer, [edit]) == clean
        second = other.edit(model, tok, REQUESTS[1:], history=[edit])
    assert second.info["nas_anchor"] == clean


@pytest.mark.parametrize("name", ["memit", "alphaedit", "rome"])
def test_norm_anchor_off_is_the_papers_edit(tiny, tmp_path, monkeypatch, name):
    """NAS off (the default) never reaches the NAS code, and norm_anchor=False gives the same edit,
    bit for bit, as an editor that does not mention it."""
    model, tok = tiny("llama")
    default = contract_editor(name, model, tok, edit_aware=False, templates=[(3, 2)], kl_factor=0.0625)
    assert default.hparams.norm_anchor is False
    module = __import__(f"kedit.editors.{'memit' if name == 'alphaedit' else name}", fromlist=["x"])
    for fn in ("anchor_norm", "anchor_values"):
        monkeypatch.setattr(module, fn, lambda *a, **k: pytest.fail("NAS code reached with norm_anchor off"))
    a = default.edit(model, tok, REQUESTS)
    off = contract_editor(name, model, tok, edit_aware=False, templates=[(3, 2)], kl_factor=0.0625,
                          norm_anchor=False)
    b = off.edit(model, tok, REQUESTS)
    assert "nas_anchor" not in a.info
    for n in a.names:
        assert torch.equal(a.delta(n), b.delta(n))


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

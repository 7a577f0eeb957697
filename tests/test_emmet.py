"""EMMET: the batch update meets every request's equality constraint, one request is ROME's
update, the ridge only acts on batches, and the editor's own path on tiny models (the contract
suite covers raising the targets, apply, restore, save and load)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kedit.editors.emmet import EMMET
from kedit.editors.rome import rank_one_right
from kedit.models import arch_of
from conftest import assert_state_equal
from contract_settings import paper_editor

REQUESTS = [
    {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"},
    {"prompt": "Michael Jordan plays", "subject": "Michael Jordan", "target_new": "soccer"},
    {"prompt": "The Eiffel Tower is located in", "subject": "The Eiffel Tower", "target_new": "Berlin"},
]


def problem(d_in: int = 16, d_out: int = 8, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, d_in, generator=g, dtype=torch.float64)
    C = X.T @ X / 64  # a second moment E[kkᵀ]
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    return C, K, R


def test_batch_update_meets_every_constraint():
    C, K, R = problem()
    left, right = EMMET(emmet_lambda=0.0, cov_ridge=0.0).solve(K, R, C)
    assert left.shape == R.shape and right.shape == K.shape  # rank n
    torch.testing.assert_close(left @ right.T @ K, R, atol=1e-9, rtol=0)  # ΔW kᵢ = rᵢ for every i


def test_ridge_relaxes_batches_only():
    C, K, R = problem()
    exact = EMMET(emmet_lambda=0.0, cov_ridge=0.0).solve(K, R, C)
    relaxed = EMMET(emmet_lambda=0.1, cov_ridge=0.0).solve(K, R, C)
    miss = (relaxed[0] @ relaxed[1].T @ K - R).norm() / R.norm()
    assert 0 < miss < 0.5  # a regularized fit: close, no longer exact
    torch.testing.assert_close(relaxed[1], exact[1])  # C⁻¹K does not depend on it
    one = EMMET(emmet_lambda=0.1, cov_ridge=0.0).solve(K[:, :1], R[:, :1], C)
    torch.testing.assert_close(one[0] @ one[1].T @ K[:, :1], R[:, :1], atol=1e-9, rtol=0)


def test_one_request_is_romes_update():
    C, K, R = problem(n=1)
    left, right = EMMET(cov_ridge=0.0).solve(K, R, C)
    rome = R[:, 0, None] * rank_one_right(K[:, 0], torch.linalg.cholesky(C))[None, :]  # δ rᵀ, Eq. 2
    torch.testing.assert_close(left @ right.T, rome, atol=1e-10, rtol=1e-8)


def test_scale_of_C_cancels_without_the_ridge():
    C, K, R = problem()
    a = EMMET(emmet_lambda=0.0, cov_ridge=0.0, mom2_update_weight=1.0).solve(K, R, C)
    b = EMMET(emmet_lambda=0.0, cov_ridge=0.0, mom2_update_weight=1e4).solve(K, R, C)
    torch.testing.assert_close(a[0] @ a[1].T, b[0] @ b[1].T, atol=1e-10, rtol=1e-8)


def test_repeated_keys_fall_back_to_the_pseudo_inverse(caplog):
    C, K, R = problem(n=2)
    K = torch.cat([K[:, :1], K[:, :1]], 1)  # the same subject twice: D is singular
    left, right = EMMET(emmet_lambda=0.0, cov_ridge=0.0).solve(K, R, C)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert "pseudo-inverse" in caplog.text


def test_default_layer_is_one_mlp_at_the_official_depth():
    assert EMMET.default_layers(28) == [5]  # GPT-J: layer 5
    assert EMMET.default_layers(30) == [5]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_paper_path_meets_the_constraints_and_leaves_the_model(tiny, family):
    model, tok = tiny(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = paper_editor("emmet", model, tok)
    editor.hparams = dataclasses.replace(editor.hparams, layers=[1], kl_factor=0.0, clamp_norm_factor=1e4,
                                         v_steps=40)
    captured = {}
    solve = editor.solve

    def spy(K, R, C):
        captured.update(K=K, R=R)
        return solve(K, R, C)

    editor.solve = spy
    edit = editor.edit(model, tok, REQUESTS)
    assert_state_equal(model, state)
    name = arch_of(model).mlp_out_weight(1)
    assert edit.names == [name] and edit.info["method"] == "emmet" and edit.info["n_requests"] == 3
    # in the weight's own orientation (GPT-2's Conv1D stores (in, out)): ΔW K ≈ R, up to emmet_lambda's ridge
    delta = edit.delta(name).double()
    dW = delta.T if delta.shape[0] == captured["K"].shape[0] else delta
    miss = (dW @ captured["K"] - captured["R"]).norm() / captured["R"].norm()
    assert miss < 0.05


def test_per_template_keys_meet_the_constraint_on_every_template(tiny):
    """``per_template_keys`` (MEMIT's hyperparameter, EMMET inherits it): one constraint per request
    and template, so without the ridge the edited layer maps every template's key, not only their
    mean, to the request's residual."""
    from kedit.editors.locate import context_templates, locate_requests, subject_keys

    model, tok = tiny("llama")
    editor = paper_editor("emmet", model, tok, layers=[1], templates=[(3, 3)], emmet_lambda=0.0, cov_ridge=0.0,
                          per_template_keys=True)
    captured = {}
    solve = editor.solve
    editor.solve = lambda K, R, C: captured.update(R=R) or solve(K, R, C)
    edit = editor.edit(model, tok, REQUESTS)
    reqs = locate_requests(REQUESTS)
    templates = context_templates(model, tok, editor.hparams.templates, editor.hparams.template_seed)
    keys, _ = subject_keys(model, tok, reqs, templates, [1], per_template=True)
    mean, _ = subject_keys(model, tok, reqs, templates, [1])
    n, T, d_in = keys[1].shape
    assert (n, T) == (3, len(templates)) and T > 1
    torch.testing.assert_close(keys[1].mean(1), mean[1])
    name = arch_of(model).mlp_out_weight(1)
    dW = edit.delta(name).double()
    r = captured["R"][:, ::T] * T ** 0.5  # the request's residual, before the 1/√T weight
    for t in range(T):
        torch.testing.assert_close(dW @ keys[1][:, t].double().T, r, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="per_template_keys"):
        paper_editor("emmet", model, tok, layers=[1], per_template_keys=True, edit_aware=True).edit(model, tok,
                                                                                                    REQUESTS)

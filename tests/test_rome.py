"""ROME: tiny models of every orientation, the value optimization's KV-cache shortcut, and a
real edit of SmolLM2-135M ("The capital of France is" -> " Rome") under greedy decoding."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

from kedit.data.encode import encode, target_logprobs
from kedit.editors import WeightDelta
from kedit.editors.locate import context_templates, locate_requests, subject_last_index
from kedit.editors.rome import ROME
from kedit.editors.values import optimize_values
from kedit.hooks import trace
from kedit.models import arch_of
from conftest import assert_state_equal
from contract_settings import contract_editor

FRANCE = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"}


def logprob(model, tok, reqs):
    b = encode(tok, [r["prompt"] for r in reqs], [r["target_new"] for r in reqs])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return target_logprobs(logits, b["labels"])[0]


@pytest.mark.parametrize("at", ["mlp_out", "block"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "gptj", "qwen3", "gemma2"])
def test_prefix_cache_equals_full_forward(tiny, family, at):
    """Optimizing on the suffix against a KV cache of the prefix, with the blocks below δ
    replayed, is the full forward, exactly: δ at an MLP output (ROME) or a block output (MEMIT)."""
    model, tok = tiny(family)
    editor = contract_editor("rome", model, tok)
    hp = dataclasses.replace(editor.hparams, v_steps=3, v_stop_nll=0.0, kl_factor=0.0625, edit_aware=False,
                             prefix_cache=True)
    reqs = locate_requests([FRANCE, {"prompt": "Michael Jordan plays", "subject": "Michael Jordan",
                                     "target_new": "soccer"}])
    templates = context_templates(model, tok, [(4, 5)], seed=0)
    module = arch_of(model).mlp_out_module(1) if at == "mlp_out" else arch_of(model).block(1)
    calls = []  # block 0 does not depend on δ: the fast path runs it for the prefix and the first step only
    handle = model.get_submodule(arch_of(model).mlp_out_module(0)).register_forward_hook(lambda *a: calls.append(1))
    fast = optimize_values(model, tok, reqs, templates, module, hp, want_keys=True)
    handle.remove()
    assert len(calls) == 2
    full = optimize_values(model, tok, reqs, templates, module, dataclasses.replace(hp, prefix_cache=False),
                           want_keys=True)
    torch.testing.assert_close(fast.keys, full.keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.init, full.init, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.delta, full.delta, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_finished_requests_leave_the_batch(tiny, family):
    """Per-request early stop with compaction: a batch gives each request the δ it gets alone."""
    model, tok = tiny(family)
    editor = contract_editor("rome", model, tok)
    hp = dataclasses.replace(editor.hparams, v_steps=8, v_stop_nll=0.0, kl_factor=0.0625, edit_aware=False, v_lr=0.5,
                             prefix_cache=True)
    reqs = locate_requests([FRANCE, {"prompt": "Michael Jordan plays", "subject": "Michael Jordan",
                                     "target_new": "soccer"}])
    templates = context_templates(model, tok, [(4, 5)], seed=0)
    module = arch_of(model).mlp_out_module(1)
    # the first request's NLL after 3 and 4 steps: stop it between the two
    nll3 = optimize_values(model, tok, reqs[:1], templates, module, dataclasses.replace(hp, v_steps=3)).nll[0]
    nll4 = optimize_values(model, tok, reqs[:1], templates, module, dataclasses.replace(hp, v_steps=4)).nll[0]
    assert nll4 < nll3
    hp = dataclasses.replace(hp, v_stop_nll=(nll3 + nll4) / 2)
    both = optimize_values(model, tok, reqs, templates, module, hp)
    alone = [optimize_values(model, tok, [r], templates, module, hp) for r in reqs]
    assert both.steps[0] == 4 and both.steps[0] != both.steps[1]
    assert both.steps == [a.steps[0] for a in alone]
    torch.testing.assert_close(both.delta, torch.cat([a.delta for a in alone]), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(torch.tensor(both.nll), torch.tensor([a.nll[0] for a in alone]), rtol=1e-3, atol=1e-5)


def stop_setup(tiny, monkeypatch, record, **hparams):
    """One request of the tiny llama, its templates and edited module, the value hyperparameters
    (``hparams`` over a plain, short optimization), and ``target_logprobs`` spied on with ``record``
    (called with its output at every step)."""
    import kedit.editors.values as values

    model, tok = tiny("llama")
    hp = dataclasses.replace(contract_editor("rome", model, tok).hparams, v_stop_nll=0.0, edit_aware=False,
                             prefix_cache=True, kl_factor=0.0625, **hparams)
    # the subject ends the prompt: δ acts on the predicting position, so a tiny random model can reach the argmax
    reqs = locate_requests([{"prompt": "The capital of France", "subject": "France", "target_new": "Rome"}])
    templates = context_templates(model, tok, [(4, 3)], seed=0)
    real = values.target_logprobs

    def spy(logits, labels):
        out = real(logits, labels)
        record(out)
        return out

    monkeypatch.setattr(values, "target_logprobs", spy)
    return functools.partial(optimize_values, model, tok, reqs, templates, arch_of(model).mlp_out_module(0)), hp


def test_argmax_stop(tiny, monkeypatch):
    """ENCORE's most-probable early stopping: the optimization stops at the first step where the
    target is the argmax at every target token of every template, with the δ of that many steps."""
    seen = []
    optimize, hp = stop_setup(tiny, monkeypatch, lambda out: seen.append(bool((out[1] == out[2]).all())),
                              v_steps=30, v_stop_argmax=True)
    vals = optimize(hp)
    assert 0 < vals.steps[0] < hp.v_steps
    assert len(seen) == vals.steps[0] + 1 and seen[-1] and not any(seen[:-1])
    fixed = optimize(dataclasses.replace(hp, v_stop_argmax=False, v_steps=vals.steps[0]))
    torch.testing.assert_close(vals.delta, fixed.delta)


def test_probability_stop(tiny, monkeypatch):
    """``v_stop_prob``: the optimization stops at the first step where the target's per-token
    probability is at least p on every template, with the δ of that many steps."""
    least = []
    optimize, hp = stop_setup(tiny, monkeypatch, lambda out: least.append(float(torch.exp(out[0].detach() / out[2]).min())),
                              v_steps=10, v_stop_argmax=False, v_lr=0.5)
    optimize(hp)  # the least probability, step by step
    curve = list(least)
    k = next(k for k in range(1, len(curve)) if curve[k] > max(curve[:k]))  # the first new high
    p = (curve[k] + max(curve[:k])) / 2
    least.clear()
    vals = optimize(dataclasses.replace(hp, v_stop_prob=p))
    assert vals.steps[0] == k and len(least) == k + 1
    fixed = optimize(dataclasses.replace(hp, v_steps=k))
    torch.testing.assert_close(vals.delta, fixed.delta)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_rank_one_update_maps_key_to_value(tiny, family):
    """ΔW k* = δ (r-ROME: the same key computes and applies the update), in storage orientation."""
    model, tok = tiny(family)
    editor = contract_editor("rome", model, tok)
    editor.hparams = dataclasses.replace(editor.hparams, edit_aware=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit = editor.edit(model, tok, FRANCE)
    assert_state_equal(model, state)
    arch = arch_of(model)
    name = arch.mlp_out_weight(0)
    assert isinstance(edit, WeightDelta) and list(edit.factors) == [name]
    left, right = edit.factors[name]
    assert left.shape[1] == right.shape[1] == 1
    dW = arch.as_out_in(edit.delta(name))  # (d_out, d_in)
    d_in, d_out = arch.mlp_dims(model, 0)
    assert dW.shape == (d_out, d_in)
    # the key at the subject's last token of the bare prompt (the only template here)
    text = FRANCE["prompt"]
    idx = subject_last_index(tok, text, text.rfind("France") + len("France"))
    module = arch.mlp_out_module(0)
    with torch.no_grad(), trace(model, [module], inputs=True) as rec:
        model(**{k: v for k, v in tok(text, return_tensors="pt").items() if k != "token_type_ids"})
    k = rec[module].input[0, idx]
    before = rec[module].output[0, idx]
    with edit.applied(model), torch.no_grad(), trace(model, [module]) as rec2:
        model(**{k: v for k, v in tok(text, return_tensors="pt").items() if k != "token_type_ids"})
    assert_state_equal(model, state)
    torch.testing.assert_close(rec2[module].output[0, idx] - before, dW @ k, rtol=1e-4, atol=1e-5)
    assert (dW @ k).norm() > 0


def test_fit_keys_solves_every_key_with_least_c_norm():
    """``fit_keys``: r·k_t = 1 for every key, and no other solution has a smaller rᵀCr; for one
    key it is ROME's C⁻¹k / (kᵀC⁻¹k)."""
    from kedit.editors.rome import fit_keys

    g = torch.Generator().manual_seed(0)
    d, T = 12, 4
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = A @ A.T + 0.1 * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(C)
    K = torch.randn(T, d, generator=g, dtype=torch.float64)
    r = fit_keys(K, chol)
    torch.testing.assert_close(K @ r, torch.ones(T, dtype=torch.float64))
    # any other solution adds a direction orthogonal to every key, and costs more C-norm
    null = torch.linalg.svd(K).Vh[T:]  # (d - T, d): K @ null.T == 0
    other = r + null.T @ torch.randn(d - T, generator=g, dtype=torch.float64)
    torch.testing.assert_close(K @ other, torch.ones(T, dtype=torch.float64))
    assert r @ C @ r < other @ C @ other
    k = K[:1]
    u = torch.cholesky_solve(k.T, chol)[:, 0]
    torch.testing.assert_close(fit_keys(k, chol), u / (k[0] @ u))
    # a ridge pulls the fit towards smaller updates
    ridged = fit_keys(K, chol, rel_ridge=1.0)
    assert ridged @ C @ ridged < r @ C @ r


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fit_templates_gives_delta_on_every_template(tiny, family):
    """``fit_templates``: the applied update adds exactly δ at the subject's last token of every
    template (the mean-key update adds δ only in the mean)."""
    model, tok = tiny(family)
    editor = contract_editor("rome", model, tok)
    editor.hparams = dataclasses.replace(editor.hparams, edit_aware=False, templates=[(4, 5)], kl_factor=0.0,
                                         fit_templates=True, fit_ridge=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit = editor.edit(model, tok, FRANCE)
    assert_state_equal(model, state)
    arch = arch_of(model)
    name, module = arch.mlp_out_weight(0), arch.mlp_out_module(0)
    dW = arch.as_out_in(edit.delta(name))  # (d_out, d_in)
    templates = context_templates(model, tok, [(4, 5)], seed=0)
    assert len(templates) > 2
    keys = []
    for template in templates:
        text = template.replace("{}", FRANCE["prompt"])
        idx = subject_last_index(tok, text, text.index(FRANCE["prompt"]) + len("The capital of France"))
        with torch.no_grad(), trace(model, [module], inputs=True) as rec:
            model(**{k: v for k, v in tok(text, return_tensors="pt").items() if k != "token_type_ids"})
        keys.append(rec[module].input[0, idx])
    gains = [dW @ k for k in keys]
    assert gains[0].norm() > 0
    for g in gains[1:]:  # the same δ on every template, the bare prompt (templates[0]) included
        torch.testing.assert_close(g, gains[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(dW @ torch.stack(keys).mean(0), gains[0], rtol=1e-3, atol=1e-4)


def test_covariance_follows_the_weights(tiny, tmp_path, monkeypatch):
    """The covariance memo is keyed by the weights (the statistics' disk key): a changed model gets
    a new C, the unchanged one is not measured or read again, and ``history`` gives the C of the
    model before its edits."""
    import kedit.stats

    model, tok = tiny("llama")
    editor = contract_editor("rome", model, tok)
    editor.hparams = dataclasses.replace(editor.hparams, stats_cache_dir=str(tmp_path))
    calls = []
    real = kedit.stats.second_moments
    monkeypatch.setattr(kedit.stats, "second_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    chol = editor.cov_factor(model, tok, 0)
    assert torch.equal(editor.cov_factor(model, tok, 0), chol) and len(calls) == 1  # memo hit
    weight = model.get_parameter("model.embed_tokens.weight")
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(2.0)  # the keys depend on it
    assert not torch.allclose(editor.cov_factor(model, tok, 0), chol) and len(calls) == 2
    with torch.no_grad():
        weight.copy_(saved)
    assert torch.equal(editor.cov_factor(model, tok, 0), chol) and len(calls) == 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit = editor.edit(model, tok, FRANCE)
    with edit.applied(model):
        assert torch.equal(editor.cov_factor(model, tok, 0, history=[edit]), chol) and len(calls) == 2
        assert edit.is_applied
    assert_state_equal(model, state)


def test_layer_choice(tiny):
    model, _ = tiny("llama")
    assert ROME.default_layer(30) == 5 and ROME.default_layer(28) == 5 and ROME.default_layer(48) == 9
    assert ROME(layers=[2]).layer(model) == 2
    with pytest.raises(ValueError, match="one layer"):
        ROME(layers=[0, 1]).layer(model)
    with pytest.raises(ValueError, match="out of range"):
        ROME(layers=[7]).layer(model)


def test_requests_need_a_subject(tiny):
    from kedit.data import RequestError

    model, tok = tiny("llama")
    with pytest.raises(RequestError, match="subject"):
        contract_editor("rome", model, tok).edit(model, tok, {"prompt": "The capital of France is",
                                                               "target_new": "Rome"})
    with pytest.raises(RequestError, match="does not occur"):
        contract_editor("rome", model, tok).edit(model, tok, {**FRANCE, "subject": "Spain"})


def greedy(model, tok, prompt: str, n: int = 3) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:])


@pytest.mark.real_model
@pytest.mark.parametrize("config", [None, "llama.yaml"], ids=["paper", "config"])
def test_smollm2_france_rome(smollm2, tmp_path_factory, config):
    """The paper's settings and the shipped configs/rome/llama.yaml (6 templates, fit_templates, ...)."""
    from pathlib import Path

    from kedit.config import load_hparams
    from kedit.editors.rome import ROMEHparams

    model, tok = smollm2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert greedy(model, tok, "The capital of France is").startswith(" Paris")
    hp = ROMEHparams() if config is None else load_hparams(
        ROMEHparams, Path(__file__).resolve().parents[1] / "configs" / "rome" / config)
    editor = ROME(dataclasses.replace(hp, corpus=None, stats_tokens=10_000,  # the packaged corpus
                                      stats_cache_dir=str(tmp_path_factory.mktemp("stats"))))
    edit = editor.edit(model, tok, FRANCE)
    assert_state_equal(model, state)  # edit() is pure
    with edit.applied(model):
        assert greedy(model, tok, "The capital of France is").startswith(" Rome")
        assert greedy(model, tok, "The capital of Germany is").startswith(" Berlin")
    assert_state_equal(model, state)  # restore is bit-exact


# --------------------------------------------------------------------------- caches


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty $KEDIT_CACHE, no templates in memory, and the caches' first warnings again."""
    import kedit.atomic
    import kedit.editors.locate as locate

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(locate, "_TEMPLATES", {})
    monkeypatch.setattr(kedit.atomic, "_WARNED", set())
    return tmp_path / "cache"


def _warnings(caplog, what):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and what in r.getMessage()]


def test_damaged_templates_cache_is_regenerated(tiny, fresh_cache, caplog, monkeypatch):
    """A truncated templates file (a killed write before writes were atomic) costs one
    warning and a regeneration, not every ROME/MEMIT/AlphaEdit edit of that model."""
    import kedit.editors.locate as locate

    model, tok = tiny("llama")
    templates = context_templates(model, tok, [(2, 5)], seed=0)
    (path,) = (fresh_cache / "templates").glob("*.json")
    path.write_text(path.read_text()[:20])
    monkeypatch.setattr(locate, "_TEMPLATES", {})
    assert context_templates(model, tok, [(2, 5)], seed=0) == templates
    warnings = _warnings(caplog, "context templates")
    assert len(warnings) == 1 and "damaged" in warnings[0] and str(path) in warnings[0]
    assert json.loads(path.read_text()) == templates and [p.name for p in path.parent.iterdir()] == [path.name]


def test_rome_edits_with_an_unwritable_cache(tiny, fresh_cache, caplog):
    """$KEDIT_CACHE that is not a folder: the edit is made, each cache warns once."""
    fresh_cache.write_text("")
    model, tok = tiny("llama")
    editor = contract_editor("rome", model, tok)
    editor.hparams = dataclasses.replace(editor.hparams, v_steps=5, stats_tokens=300)
    p0 = logprob(model, tok, [FRANCE])
    edit = editor.edit(model, tok, [FRANCE])
    with edit.applied(model):
        assert logprob(model, tok, [FRANCE]) > p0
    assert len(_warnings(caplog, "cannot write the context templates cache")) == 1
    assert len(_warnings(caplog, "cannot write the statistics cache")) == 1

"""MALMEN: the least-squares aggregation and its backward, the meta-gradient, many edits at once,
Lightning training (checkpoint, export and load, resume, DDP equivalence).

Tiny models only. The editor contract (pure edit, exact restore, save/load, stacks) runs in
tests/test_contract.py, which picks MALMEN up from the registry. The DDP test launches
``python -m kedit.train`` subprocesses on CPU with gloo, as MEND's (tests/test_mend.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import kedit
from kedit.checkpoint import BaseModelMismatch, read_artifact_meta
from kedit.data.encode import encode, model_inputs, target_logprobs
from kedit.editors.malmen import MALMEN, MALMENHparams, answer_rows, ridge_matrix, solve_backward
from kedit.editors.mend import MEND
from kedit.testing import tiny_model

from test_mend import _cli, _data, _ddp_args, _hypernet, _trainer, logp

CONFIG = "configs/malmen/tiny-llama.yaml"


def _module(**hp):
    from kedit.lightning.malmen import MALMENModule

    cfg = dict(num_last_layers=2, rank=8, edit_lr=1.0, meta_lr=1e-3, micro_batch=2, token_chunk=8)
    return MALMENModule("tiny-llama", MALMENHparams(**{**cfg, **hp}))


def test_ridge_solution_is_the_least_squares_minimiser():
    """S = (KᵀK + λI)⁻¹KᵀD zeroes the gradient of Σ_j ‖Sᵀk_j − d_j‖² + λ‖S‖²."""
    torch.manual_seed(0)
    K, D, lam = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64), 0.3
    S = torch.linalg.solve(ridge_matrix(K.T @ K, lam), K.T @ D)
    grad = 2 * K.T @ (K @ S - D) + 2 * lam * S
    assert grad.abs().max() < 1e-10
    assert (K @ S - D).norm() < (K @ torch.zeros_like(S) - D).norm()


def test_solve_backward_matches_autograd():
    torch.manual_seed(0)
    K = torch.randn(9, 6, dtype=torch.float64)
    D = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    C = torch.randn(6, 4, dtype=torch.float64)
    A = ridge_matrix(K.T @ K, lam.exp())
    S = torch.linalg.solve(A, K.T @ D)
    (S * C).sum().backward()  # L = ⟨C, S⟩: ∂L/∂S = C
    dD, dlam = solve_backward(K, A.detach(), S.detach(), C, lam.exp().detach())
    assert torch.allclose(dD, D.grad) and torch.allclose(dlam, lam.grad)


def test_answer_rows_are_the_positions_that_predict_the_answer():
    _, tok = tiny_model("llama")
    batch = encode(tok, ["ab", "abcd"], ["x", "yz"])
    rows = answer_rows(batch, seq2seq=False)  # over the real tokens, row-major
    lengths = batch["attention_mask"].sum(1).tolist()
    first = rows[:lengths[0]]
    assert rows.sum() == (batch["labels"] != -100).sum()  # one row per answer token
    assert first[int(batch["prompt_len"][0]) - 1] and not first[-1]  # last prompt token yes, last answer token no


def test_meta_gradient_equals_autograd_through_the_solve():
    """The decoupled step (S without a graph, ∂L/∂S from the LM in micro-batches, back through the solve)
    gives the gradient of differentiating the whole pipeline at once."""
    from kedit.editors.mend import _key
    from kedit.lightning.data import collate
    from kedit.utils import chunks

    torch.manual_seed(0)
    module = _module(micro_batch=2, token_chunk=8)
    with torch.no_grad():  # leave the identity: gradients reach A as well
        for block in module.malmen.blocks.values():
            for b in block:
                b.B.normal_(0, 0.01)
    dm = _data(n=5, batch_size=5)
    dm.setup()
    batch = collate([dm.train_set[i] for i in range(5)])
    module.train()
    surrogate, gen_nll, loc_kl = module.meta_step(batch)  # also adds the batch to the statistics
    fast = torch.autograd.grad(surrogate, list(module.malmen.parameters()))
    module.eval()
    net = module.malmen
    K, G = module._features(batch)
    S = {}
    for name in net.names:  # the plain reference: one graph from the hypernetwork to the loss
        D = net.output_change(name, K[name], G[name])
        S[name] = torch.linalg.solve(ridge_matrix(K[name].T @ K[name], net.lam[_key(name)].exp()), K[name].T @ D)
    loss = 0
    for rows in chunks(range(5), 2):
        nll, kl = module._losses(batch, rows, module._edited(S))
        loss = loss + (nll.sum() + module.cfg.loc_coef * kl.sum()) / 5
    reference = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    assert torch.isclose(loss, gen_nll + module.cfg.loc_coef * loc_kl, rtol=1e-4)
    for (name, _), a, b in zip(net.named_parameters(), fast, reference):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-7 + 1e-4 * b.abs().max().item()), name
    assert any(g.abs().sum() > 0 for (n, _), g in zip(net.named_parameters(), fast) if n.endswith(".A"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_least_squares_beats_summed_shifts_for_many_edits(family):
    """48 edits at once on the same weights (last 3 MLP output projections), both editors untrained
    (identity hypernetworks), each at its best step size of a grid: MALMEN's least-squares
    aggregation raises log P(target_new) more than MEND's sum of per-token shifts."""
    from kedit.data.loaders import load_requests

    logging.getLogger("kedit.editors.mend").setLevel(logging.ERROR)  # "no trained hypernetwork"
    model, tok = tiny_model(family, 0, initializer_range=0.2)
    requests = load_requests("counterfact-sample")[:48]
    batch = encode(tok, [r.prompt for r in requests], [r.target_new for r in requests])

    def batch_logp() -> torch.Tensor:
        with torch.no_grad():
            return target_logprobs(model(**model_inputs(batch)).logits, batch["labels"])[0]

    before = batch_logp()
    best = {}
    for cls in (MALMEN, MEND):
        gains = []
        for lr in (0.1, 0.3, 1.0, 3.0):
            edit = cls(edit_lr=lr, rank=8, num_last_layers=3, weights=["mlp_out"]).edit(model, tok, requests)
            with edit.applied(model):
                gains.append((batch_logp() - before).mean().item())
        best[cls.name] = max(gains)
    assert best["malmen"] > 1.2 * best["mend"] > 0, best


# --------------------------------------------------------------------------- Lightning


def test_fit_checkpoint_export_and_load(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=3)
    trainer.fit(module, _data(n=12, batch_size=4))
    assert {"val/edit_success", "val/paraphrase_success", "val/locality", "val/score"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)  # no pickled objects
    assert not [k for k in ckpt["state_dict"] if k.startswith("base.")]
    assert ckpt["kedit_editor"]["editor"] == "malmen" and ckpt["kedit_editor"]["base"]["hash"]
    assert ckpt["state_dict"]["malmen.norms.32x64.count"] > 0  # statistics of the training tokens are kept
    from kedit.train import export

    model, tok = module.base, module.tokenizer
    requests = [{"prompt": "The capital of France is", "target_new": "Rome"},
                {"prompt": "Toko Yasuda plays the", "target_new": "piano"}]
    expected = module.as_editor().edit(model, tok, requests)
    for art in (export(tmp_path / "m.ckpt", tmp_path / "a.safetensors"), module.export_editor(tmp_path / "b.safetensors")):
        assert read_artifact_meta(art)["editor"] == "malmen"
        editor = kedit.load_editor(art, model=model)
        assert isinstance(editor, MALMEN) and not editor.net.training
        edit = editor.edit(model, tok, requests)  # one WeightDelta for the batch
        assert edit.names == expected.names and edit.info["n_requests"] == 2
        for name in edit.names:
            assert torch.allclose(edit.delta(name), expected.delta(name), atol=1e-6)
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(BaseModelMismatch):
        kedit.load_editor(tmp_path / "a.safetensors", model=other)


def test_training_lowers_the_meta_loss(tmp_path):
    """Steps on one small set lower the paraphrase NLL after the batch edit: the meta-gradient trains."""
    import lightning as L

    from kedit.lightning.data import collate

    L.seed_everything(0)
    module = _module(meta_lr=3e-3)
    dm = _data(n=8, batch_size=8)
    dm.setup()
    batch = collate([dm.train_set[i] for i in range(8)])
    module.eval()
    before = module.meta_step(batch)[1].item()
    _trainer(tmp_path, max_steps=15, limit_val_batches=0).fit(module, dm)
    module.eval()
    after = module.meta_step(batch)[1].item()
    assert after < before, (before, after)
    assert all(b.B.abs().sum() > 0 for blocks in module.malmen.blocks.values() for b in blocks)  # left the identity


def test_resume_matches_uninterrupted(tmp_path):
    """Stop after 2 steps, resume to 4: the same hypernetwork, statistics and optimizer state as 4 in one go."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, dirpath, ckpt_path=None):
        L.seed_everything(0)
        module = _module()
        cb = ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = _trainer(tmp_path, max_steps=steps, limit_val_batches=0, enable_checkpointing=True, callbacks=[cb])
        trainer.fit(module, _data(n=12, batch_size=2), ckpt_path=ckpt_path)
        return module, trainer

    full, _ = run(4, tmp_path / "full")
    run(2, tmp_path / "part")
    resumed, trainer = run(4, tmp_path / "part", ckpt_path="last")
    assert trainer.global_step == 4
    a, b = full.malmen.state_dict(), resumed.malmen.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt = [torch.load(tmp_path / run / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
           for run in ("full", "part")]
    for k in opt[0]:
        assert torch.equal(opt[0][k]["exp_avg"], opt[1][k]["exp_avg"])


def test_ddp_two_processes_equal_one_process_double_batch(tmp_path):
    """gloo DDP, 2 processes x batch 3 == 1 process x batch 6 after 2 steps: one least-squares shift per
    global batch (KᵀK, KᵀD and ∂L/∂S summed over processes), the same statistics and the same update."""
    one = _cli(_ddp_args(tmp_path, "one.safetensors", 6, 1, "auto", config=CONFIG))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(_ddp_args(tmp_path, "two.safetensors", 3, 2, "ddp", config=CONFIG))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _hypernet(tmp_path / "one.safetensors"), _hypernet(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=1e-4), k
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith(".B"))  # the zero-initialized B learned
    assert any(not torch.isclose(a[k], torch.tensor(1.0)) for k in a if k.startswith("lr."))  # lr_m moved


def test_val_score_is_the_harmonic_mean_and_zero_when_one_rate_is():
    from kedit.lightning.common import val_score

    assert val_score([torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.5)]).item() == pytest.approx(0.6)
    assert val_score([torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.9)]).item() == 0.0


def test_neighbours_are_ignored_with_a_warning(tmp_path, caplog):
    """MALMEN's loss has no place for same-relation neighbours: fitting with them says so."""
    module = _module()
    with caplog.at_level(logging.WARNING, logger="kedit.lightning.common"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, _data(n=4, batch_size=2, neighbours=2))
    assert "MALMENModule ignores EditDataModule(neighbours=2)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kedit.lightning.common"):
        _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(_module(), _data(n=4, batch_size=2))
    assert "ignores EditDataModule" not in caplog.text


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "malmen-smollm2-135m-counterfact.safetensors"


@pytest.mark.real_model
def test_shipped_editor_edits_a_batch_in_one_shift(smollm2):
    """The shipped MALMEN editor: one WeightDelta for three CounterFact-style facts, each one moved."""
    model, tok = smollm2
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} not shipped")
    editor = kedit.load_editor(SHIPPED, model=model)
    requests = [{"prompt": "The capital of France is", "target_new": "Rome"},
                {"prompt": "Danielle Darrieux's mother tongue is", "target_new": "English"},
                {"prompt": "The Eiffel Tower is located in the city of", "target_new": "London"}]
    before = [logp(model, tok, r) for r in requests]
    edit = editor.edit(model, tok, requests)
    assert edit.info["n_requests"] == 3
    with edit.applied(model):
        after = [logp(model, tok, r) for r in requests]
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)
    assert [logp(model, tok, r) for r in requests] == before  # restored

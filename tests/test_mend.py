"""MEND: hypernetwork, one-shot edits, artifacts, Lightning training (fast_dev_run, resume, DDP).

Tiny models only, except the shipped-editor test (``real_model``). The DDP and multi-node
tests launch ``python -m kedit.train`` subprocesses on CPU with gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kedit
from kedit.checkpoint import BaseModelMismatch, base_model_identity, read_artifact_meta
from kedit.data.encode import encode, model_inputs, target_logprobs
from kedit.editors.mend import MEND, MENDHparams, MENDNet, RunningNorm, edited_weights, gradient_inputs
from kedit.testing import tiny_model

from contract_settings import paper_editor

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "mend-smollm2-135m-counterfact.safetensors"
LOCAL = ROOT / "checkpoints" / "mend-smollm2-135m-counterfact-local.safetensors"  # c_loc 10: the local point
ZSRE = ROOT / "checkpoints" / "mend-smollm2-135m-zsre.safetensors"  # trained on zsRE questions (GPU run)
REQ = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"}


def logp(model, tok, req, seq2seq=False):
    b = encode(tok, [req["prompt"]], [req["target_new"]], seq2seq=seq2seq)
    with torch.no_grad():
        return target_logprobs(model(**model_inputs(b)).logits, b["labels"], seq2seq)[0].item()


def test_edited_weights_follow_arch_table():
    model, _ = tiny_model("gpt2")
    names = edited_weights(model, MENDHparams(num_last_layers=2))
    assert names == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                     "transformer.h.2.mlp.c_fc.weight", "transformer.h.2.mlp.c_proj.weight"]
    with pytest.raises(ValueError, match="out of range"):
        edited_weights(model, MENDHparams(layers=[7]))


def test_identity_init_is_a_gradient_step():
    """Untrained MEND (identity MLP, no statistics): ΔW = -α Σ δ uᵀ = -α ∇_W NLL."""
    model, tok = tiny_model("llama")
    editor = MEND(edit_lr=0.5, rank=4, num_last_layers=1)
    delta = editor.edit(model, tok, REQ)
    b = encode(tok, [REQ["prompt"]], [REQ["target_new"]])
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    out = model(**model_inputs(b))
    nll = -(target_logprobs(out.logits, b["labels"])[0] / (b["labels"] != -100).sum())
    nll.sum().backward()
    for name in delta.factors:
        assert torch.allclose(delta.delta(name), -0.5 * params[name].grad, atol=1e-6, rtol=1e-4), name
    for p in params.values():
        p.requires_grad_(False)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_one_shot_edit_pure_and_effective(family):
    model, tok = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = paper_editor("mend", model, tok)
    p0 = logp(model, tok, REQ, family == "t5")
    edit = editor.edit(model, tok, REQ)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # edit() is pure
    # low rank: one factor column per real token of the edit example
    left, right = next(iter(edit.factors.values()))
    assert left.shape[1] == right.shape[1] == edit.info["rank"]
    with edit.applied(model):
        assert logp(model, tok, REQ, family == "t5") > p0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # restore bit-exact


def test_gradient_inputs_independent_of_batch():
    """δ of one example does not depend on the other examples in its batch (per-example losses)."""
    model, tok = tiny_model("llama")
    names = edited_weights(model, MENDHparams(num_last_layers=1))
    one = encode(tok, ["The capital of France is"], ["Rome"])
    two = encode(tok, ["The capital of France is", "Toko Yasuda plays the"], ["Rome", "piano"])
    u1, d1, _ = gradient_inputs(model, names, one, False)
    u2, d2, ex = gradient_inputs(model, names, two, False)
    for n in names:
        assert torch.allclose(d1[n], d2[n][ex == 0], atol=1e-6)
        assert torch.allclose(u1[n], u2[n][ex == 0], atol=1e-6)


def test_running_norm_statistics():
    norm = RunningNorm(3)
    x = torch.randn(100, 3) * torch.tensor([1.0, 10.0, 0.1]) + 5
    norm.update(x[:40])
    norm.update(x[40:])
    y = norm(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(3), atol=1e-3)


def test_artifact_roundtrip_and_base_refusal(tmp_path):
    model, tok = tiny_model("llama")
    hp = MENDHparams(num_last_layers=2, rank=4, edit_lr=0.3)
    net = MENDNet(hp, {n: tuple(model.get_parameter(n).shape) for n in edited_weights(model, hp)})
    with torch.no_grad():
        for p in net.mlps.parameters():
            p.add_(0.01 * torch.randn_like(p))
        net.norm_u[next(iter(net.norm_u))].update(torch.randn(10, 32))
    editor = MEND(hp, net=net.eval(), base=base_model_identity(model))
    path = editor.save(tmp_path / "mend.safetensors")
    meta = read_artifact_meta(path)
    assert meta["editor"] == "mend" and meta["hparams"]["rank"] == 4 and meta["base"]["hash"]
    loaded = kedit.load_editor(path, model=model)
    assert isinstance(loaded, MEND)
    a, b = editor.edit(model, tok, REQ), loaded.edit(model, tok, REQ)
    for name in a.factors:
        assert torch.allclose(a.delta(name), b.delta(name), atol=1e-6)
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(BaseModelMismatch, match="trained for base model"):
        kedit.load_editor(path, model=other)
    with pytest.raises(BaseModelMismatch):
        loaded.edit(other, tok, REQ)
    with pytest.raises(ValueError, match="not a kedit editor artifact"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        kedit.load_editor(tmp_path / "plain.safetensors")


# --------------------------------------------------------------------------- Lightning


def _module(family="llama", **hp):
    from kedit.lightning.mend import MENDModule

    return MENDModule(f"tiny-{family}", MENDHparams(num_last_layers=2, rank=8, edit_lr=0.1, lr=1e-3, lr_lr=1e-3, **hp))


def _data(n=16, batch_size=2, **kw):
    """The CounterFact records that ship with kedit (48: 4 held out for validation)."""
    from kedit.lightning.data import EditDataModule

    return EditDataModule("counterfact-sample", val_size=4, limit_train=n, batch_size=batch_size, **kw)


def _trainer(tmp_path, **kw):
    import lightning as L

    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                inference_mode=False, default_root_dir=str(tmp_path), enable_checkpointing=False)
    args.update(kw)
    return L.Trainer(**args)


def test_checkpoint_holds_no_base_weights(tmp_path):
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, _data())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)  # no pickled objects
    assert not [k for k in ckpt["state_dict"] if k.startswith("base.")]
    assert any(k.startswith("mend.") for k in ckpt["state_dict"])
    assert ckpt["kedit_editor"]["editor"] == "mend" and ckpt["kedit_editor"]["base"]["hash"]
    assert {"val/edit_success", "val/locality", "val/paraphrase_success"} <= set(trainer.callback_metrics)
    from kedit.train import export

    art = export(tmp_path / "m.ckpt", tmp_path / "m.safetensors")
    editor = kedit.load_editor(art, model=module.base)
    with torch.no_grad():
        for name in editor.net.state_dict():
            assert torch.equal(editor.net.state_dict()[name], module.mend.state_dict()[name].cpu())
    # a checkpoint of another base model is refused
    from kedit.lightning.mend import MENDModule

    other = MENDModule("tiny-llama", module.cfg)
    with torch.no_grad():
        other.base.get_parameter("model.embed_tokens.weight").add_(1.0)
    with pytest.raises(BaseModelMismatch):
        other.on_load_checkpoint(ckpt)


def test_training_reduces_edit_loss(tmp_path):
    """A few dozen steps on the same small set lower the edit NLL: gradients reach the hypernetwork."""
    import lightning as L

    L.seed_everything(0)
    module = _module(c_edit=1.0)
    dm = _data(n=4, batch_size=4)
    dm.setup()
    from kedit.lightning.data import collate

    batch = collate([dm.train_set[i] for i in range(4)])
    module.train()
    before = module._step(batch, evaluate=False)["edit_nll"].item()
    trainer = _trainer(tmp_path, max_steps=30, limit_val_batches=0)
    trainer.fit(module, dm)
    module.train()
    after = module._step(batch, evaluate=False)["edit_nll"].item()
    assert after < before, (before, after)


def test_same_relation_neighbours():
    """``neighbours``: other records of the same template (prompt less subject), next in file
    order, never the same subject; the validation set keeps one locality prompt."""
    from kedit.data import EditRequest
    from kedit.lightning.data import EditDataModule, EditExamples

    def req(subject, template, true):
        return EditRequest(prompt=template.format(subject), subject=subject, target_new="X", target_true=true)

    reqs = [req("A", "{} plays", "chess"), req("B", "The capital of {} is", "b"), req("C", "{} plays", "go"),
            req("A", "{} plays", "tennis"), req("D", "{} plays", "polo"), req("E", "{} plays", None)]
    ex = EditExamples(reqs, neighbours=2)
    assert ex.same_relation(0) == [2, 4] and ex.same_relation(2) == [3, 4] and ex.same_relation(1) == []
    assert ex.same_relation(3) == [4, 2]  # not record 0: the same subject
    item = ex[4]
    assert item["nb_prompts"] == ["A plays", "C plays"] and item["nb_answers"] == ["chess", "go"]
    assert EditExamples(reqs)[0]["nb_prompts"] == []
    dm = _data(n=16, neighbours=3)
    dm.setup()
    assert dm.train_set.neighbours == 3 and dm.val_set.neighbours == 0


def test_neighbours_join_the_locality_loss():
    """MEND's KL is the mean over every locality prompt's tokens: neighbours that repeat the
    example's own locality prompt leave the loss as it was; other prompts change it."""
    from kedit.lightning.data import collate

    torch.manual_seed(0)
    module = _module(c_edit=1.0, c_loc=1.0)
    module.train()
    dm = _data(n=4, batch_size=2)
    dm.setup()
    items = [dm.train_set[i] for i in range(2)]
    plain = module._step(collate(items), evaluate=False)
    repeated = [{**it, "nb_prompts": [it["loc_prompt"]] * 2, "nb_answers": [it["loc_answer"]] * 2} for it in items]
    again = module._step(collate(repeated), evaluate=False)
    assert again["loc_kl"].item() == pytest.approx(plain["loc_kl"].item(), rel=1e-5)
    assert again["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)
    other = [{**it, "nb_prompts": [items[1 - i]["prompt"]], "nb_answers": ["x"]} for i, it in enumerate(items)]
    assert module._step(collate(other), evaluate=False)["loc_kl"].item() != pytest.approx(plain["loc_kl"].item())


def test_resume_matches_uninterrupted(tmp_path):
    """Stop after 3 steps (checkpoint mid-epoch), resume to 6: same weights, optimizer and data as 6 in one go."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(steps, ckpt_path=None, dirpath=None):
        L.seed_everything(0)
        module = _module()
        cb = ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1, save_top_k=0)
        trainer = _trainer(tmp_path, max_steps=steps, limit_val_batches=0, enable_checkpointing=True,
                           callbacks=[cb])
        trainer.fit(module, _data(n=16, batch_size=2), ckpt_path=ckpt_path)
        return module, trainer

    full, _ = run(6, dirpath=tmp_path / "full")
    run(3, dirpath=tmp_path / "part")
    resumed, trainer = run(6, ckpt_path="last", dirpath=tmp_path / "part")
    assert trainer.global_step == 6
    a, b = full.mend.state_dict(), resumed.mend.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k  # includes normalizer statistics (data position)
    opt_a = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    opt_b = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    for k in opt_a:
        assert torch.allclose(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"], atol=1e-6)


# --------------------------------------------------------------------------- CLI / DDP subprocesses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args, env=None, timeout=300):
    e = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
         "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kedit.train", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def _ddp_args(tmp_path, name, batch, devices, strategy, extra=(), config="configs/mend/tiny-llama.yaml"):
    return ["fit", "--config", config, "--trainer", "trainers/ddp_cpu.yaml",
            f"--trainer.devices={devices}", f"--trainer.strategy={strategy}", "--trainer.max_steps=2",
            "--trainer.logger=false", "--trainer.callbacks=null", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.batch_size={batch}",
            "--data.init_args.limit_train=16",
            f"--export={tmp_path / name}", *extra]


def _hypernet(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ddp_two_processes_equal_one_process_double_batch(tmp_path):
    """gloo DDP, 2 processes x batch 2 == 1 process x batch 4 after 2 optimizer steps (same data, same stats)."""
    one = _cli(_ddp_args(tmp_path, "one.safetensors", 4, 1, "auto"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(_ddp_args(tmp_path, "two.safetensors", 2, 2, "ddp"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _hypernet(tmp_path / "one.safetensors"), _hypernet(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=1e-4), k
        moved += int("alpha" in k and not torch.isclose(a[k], torch.tensor(0.1)))
    assert moved > 0  # the learned step sizes left their initial edit_lr = 0.1
    ups = [k for k in a if k.endswith("up.weight")]
    assert ups and any(a[k].abs().sum() > 0 for k in ups)  # the zero-initialized up-projections learned


@pytest.mark.slow
def test_multi_node_two_nodes_one_process_each(tmp_path):
    """2 "nodes" x 1 process on this machine (NODE_RANK, MASTER_ADDR=127.0.0.1) train a few steps."""
    port = str(_free_port())
    args = _ddp_args(tmp_path, "mn.safetensors", 2, 1, "ddp", ["--trainer.num_nodes=2"])
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0"}
        procs.append(subprocess.Popen([sys.executable, "-m", "kedit.train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert "max_steps=2" in outs[0]
    assert (tmp_path / "mn.safetensors").is_file()


def test_cli_fast_dev_run_and_export(tmp_path):
    res = _cli(["fit", "--config", "configs/mend/tiny-llama.yaml", "--trainer", "trainers/cpu.yaml",
                "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--export={tmp_path / 'e.safetensors'}"])
    assert res.returncode == 0, res.stderr[-3000:]
    meta = read_artifact_meta(tmp_path / "e.safetensors")
    assert meta["editor"] == "mend" and meta["base"]["name"] == "tiny-llama"
    res = _cli(["fit", "--help"])
    assert res.returncode == 0 and "--model" in res.stdout


@pytest.mark.real_model
@pytest.mark.parametrize(("path", "req"), [
    (SHIPPED, REQ),
    (LOCAL, REQ),
    (ZSRE, {"prompt": "What is the capital of France?", "target_new": "Rome"}),  # zsRE's question form
], ids=["default", "local", "zsre"])
def test_shipped_editor_one_shot_edit(smollm2, path, req):
    model, tok = smollm2
    if not path.is_file():
        pytest.skip(f"{path} not shipped")
    editor = kedit.load_editor(path, model=model)
    p0 = logp(model, tok, req)
    edit = editor.edit(model, tok, req)
    with edit.applied(model):
        p1 = logp(model, tok, req)
    assert p1 > p0 + 1.0, (p0, p1)

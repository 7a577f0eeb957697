"""UltraEdit's parts against direct computations, and its sequence state against the official loop.

The contract suite (tests/test_contract.py) covers purity, bit-exact restore, stacking and
save/load of the edit's weights on every family; here: the normaliser's update rule, the ridge
solve, the statistics carried in the edit (saved, loaded, read from ``history``), and two turns
against a literal port of the official accumulate loop (one ``RunningMeanStd`` per shape, kept
across turns, weights changed in place).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kedit.data.encode import IGNORE, encode
from kedit.editors import Edit, EditStack
from kedit.editors.ultraedit import EPS, Moments, UltraEdit, UltraEditDelta, edited_modules, ridge
from kedit.models import arch_of
from kedit.testing import tiny_model
from kedit.utils import chunks

TURN_1 = [
    {"prompt": "The capital city of France", "subject": "France", "target_new": "is Rome"},
    {"prompt": "The sport of Michael Jordan", "subject": "Michael Jordan", "target_new": "is soccer"},
    {"prompt": "The city of the Eiffel Tower", "subject": "the Eiffel Tower", "target_new": "is Berlin"},
]
TURN_2 = [
    {"prompt": "The language of Brazil", "subject": "Brazil", "target_new": "is French"},
    {"prompt": "The river of Egypt", "subject": "Egypt", "target_new": "is the Danube"},
]
SETTINGS = {"modules": {"mlp_in": [1, 2]}, "lr": 1e-3, "micro_batch": 2}
"""Two modules of one shape per block on LLaMA (gate, up: one shared normaliser), two micro-batches."""


def tiny(family: str = "llama"):
    return tiny_model(family, 0, initializer_range=0.2)


def weights(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


# --------------------------------------------------------------------------- a literal port of the official loop


class RunningMeanStd:
    """The official normaliser (MALMEN's ``nets.RunningMeanStd``), in float64."""

    def __init__(self, size: int) -> None:
        self.n, self.mean, self.var = 0, torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
        self.std = torch.zeros(size, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / (self.std + EPS)).float()


def official_turn(model, tok, requests, names, normalizers, lr, micro_batch, conv1d) -> None:
    """One official turn, in place: cache (hooks + backward), update the normalisers, solve, W += Sᵀ."""
    modules = dict(model.named_modules())
    keys, grads = {n: [] for n in names}, {n: [] for n in names}
    for part in chunks(requests, micro_batch):
        batch = encode(tok, [r["prompt"] for r in part], [r["target_new"] for r in part])
        labels = torch.full_like(batch["labels"], IGNORE)  # official labels are pre-shifted
        labels[:, :-1] = batch["labels"][:, 1:]
        ans = labels != IGNORE
        seen = {}

        def hook(name, seen=seen):
            def fn(_m, inputs, out):
                out.retain_grad()
                seen[name] = (inputs[0], out)
            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for h in handles:
            h.remove()
        F.cross_entropy(logits[ans], labels[ans]).backward()
        for n in names:
            k, g = seen[n][0][ans].detach().float(), seen[n][1].grad[ans].float()
            shape = (k.shape[1], g.shape[1])
            normalizers.setdefault(shape, RunningMeanStd(sum(shape))).update(torch.cat([k, g], -1))
            keys[n].append(k)
            grads[n].append(g)
    params = dict(model.named_parameters())
    for n in names:
        K, G = torch.cat(keys[n]), torch.cat(grads[n])
        z = normalizers[(K.shape[1], G.shape[1])](torch.cat([K, G], -1))
        k_hat, g_hat = z[:, :K.shape[1]], z[:, K.shape[1]:]
        D = -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
        S = torch.linalg.solve(K.T @ K + torch.eye(K.shape[1]), K.T @ D)
        with torch.no_grad():
            params[f"{n}.weight"] += S if conv1d else S.T


# --------------------------------------------------------------------------- the parts


def test_normaliser_update_matches_concatenated_data():
    """Mean: exactly that of all rows. M2: the exact scatter Σ(z − z̄)² plus, per batch, its unbiased
    variance (the official rule adds b·var_b where Welford adds (b − 1)·var_b). A one-row batch adds
    no variance and stays finite."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 6, generator=g, dtype=torch.float64) * 3 + 1 for b in (5, 7, 1, 3)]
    m = Moments.empty(6)
    for z in batches:
        m = m.update(z)
    data = torch.cat(batches)
    extra = sum(z.var(0) for z in batches if z.shape[0] > 1)
    m2 = (data - data.mean(0)).square().sum(0) + extra
    assert m.count == data.shape[0]
    torch.testing.assert_close(m.mean, data.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.m2, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.std, (m2 / (data.shape[0] - 1)).sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.normalise(data), (data - data.mean(0)) / (m.std + EPS))
    one = Moments.empty(6).update(batches[2])
    assert torch.isfinite(one.std).all() and torch.isfinite(one.normalise(batches[2])).all()


@pytest.mark.parametrize("n", [3, 20])
def test_ridge_matches_least_squares(n):
    """``Sᵀ = left @ rightᵀ`` minimises Σ‖Sᵀk_p − d_p‖² + ‖S‖²: lstsq on [K; I] S = [D; 0], and the
    normal equations, for fewer and for more tokens than key dimensions."""
    g = torch.Generator().manual_seed(n)
    K, D = torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(n, 5, generator=g, dtype=torch.float64)
    left, right = ridge(K, D)
    assert left.shape == (5, n) and right.shape == (8, n)
    S = (left @ right.T).T
    stacked = torch.linalg.lstsq(torch.cat([K, torch.eye(8, dtype=K.dtype)]),
                                 torch.cat([D, torch.zeros(8, 5, dtype=D.dtype)])).solution
    torch.testing.assert_close(S, stacked, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((K.T @ K + torch.eye(8, dtype=K.dtype)) @ S, K.T @ D, rtol=1e-10, atol=1e-10)


def test_module_roles_follow_the_arch():
    llama, _ = tiny("llama")
    assert edited_modules(llama, {"mlp_in.0": [0], "mlp_in.1": [-1], "mlp_out": [1]}) == [
        "model.layers.0.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    gpt2, _ = tiny("gpt2")
    assert edited_modules(gpt2, {"mlp_in": [2]}) == ["transformer.h.2.mlp.c_fc"]
    with pytest.raises(ValueError, match="mlp_in.0 .. mlp_in.0"):
        edited_modules(gpt2, {"mlp_in.1": [0]})
    with pytest.raises(ValueError, match="unknown role 'ffn'"):
        edited_modules(gpt2, {"ffn": [0]})
    with pytest.raises(ValueError, match="out of range"):
        edited_modules(gpt2, {"mlp_out": [7]})
    with pytest.raises(ValueError, match="more than once"):
        edited_modules(llama, {"mlp_in": [0], "mlp_in.0": [0]})


# --------------------------------------------------------------------------- sequence state


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_turns_with_history_equal_the_official_accumulation(family):
    model, tok = tiny(family)
    names = edited_modules(model, SETTINGS["modules"])
    wnames = [f"{n}.weight" for n in names]
    w0 = weights(model, wnames)
    reference = copy.deepcopy(model)
    normalizers: dict = {}
    for turn in (TURN_1, TURN_2):
        official_turn(reference, tok, turn, names, normalizers, SETTINGS["lr"], SETTINGS["micro_batch"],
                      arch_of(model).conv1d)
    want = {n: w - w0[n] for n, w in weights(reference, wnames).items()}

    editor = UltraEdit(**SETTINGS)
    stack = EditStack([editor.edit(model, tok, TURN_1)])
    with stack.applied(model):
        stack.push(editor.edit(model, tok, TURN_2, history=stack), model)
        got = {n: w - w0[n] for n, w in weights(model, wnames).items()}
    assert len(normalizers) == 1, "gate and up (or c_fc of every block) share one normaliser"
    for n in wnames:
        scale = want[n].abs().max()
        assert scale > 0
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-4 * scale.item())
    last = stack.edits[-1].stats
    (shape, ref), = normalizers.items()
    assert list(last) == [f"{shape[0]}x{shape[1]}"] and last[f"{shape[0]}x{shape[1]}"].count == ref.n
    torch.testing.assert_close(last[f"{shape[0]}x{shape[1]}"].mean, ref.mean, rtol=1e-5, atol=1e-8)


def test_without_history_an_edit_is_independent_of_earlier_calls():
    model, tok = tiny()
    editor = UltraEdit(**SETTINGS)
    first = editor.edit(model, tok, TURN_2)
    earlier = editor.edit(model, tok, TURN_1)
    again = editor.edit(model, tok, TURN_2)
    chained = editor.edit(model, tok, TURN_2, history=[earlier])  # statistics from TURN_1 + TURN_2
    for name in first.names:
        assert torch.equal(first.delta(name), again.delta(name))
        assert not torch.allclose(first.delta(name), chained.delta(name))
    (shape, m), = again.stats.items()
    assert m.count == chained.stats[shape].count - earlier.stats[shape].count


def test_statistics_save_load_and_continue(tmp_path):
    model, tok = tiny()
    editor = UltraEdit(**SETTINGS)
    edit = editor.edit(model, tok, TURN_1)
    loaded = Edit.load(edit.save(tmp_path / "e.safetensors"), model=model)
    assert isinstance(loaded, UltraEditDelta) and set(loaded.stats) == set(edit.stats)
    for shape, m in edit.stats.items():
        assert loaded.stats[shape].count == m.count and m.count > 0
        assert torch.equal(loaded.stats[shape].mean, m.mean) and torch.equal(loaded.stats[shape].m2, m.m2)
    with edit.applied(model):
        want = editor.edit(model, tok, TURN_2, history=[edit])
    with loaded.applied(model):
        got = editor.edit(model, tok, TURN_2, history=[loaded])
    for name in want.names:
        assert torch.equal(got.delta(name), want.delta(name))


def test_sequential_edits_each_raise_their_target_and_keep_the_first():
    """Efficacy on a tiny model: three one-request turns through ``history``; each raises its own
    target, and the first is still above its unedited log-probability after the third."""
    from test_contract import target_logprob

    model, tok = tiny()
    editor = UltraEdit(**SETTINGS)
    base = [target_logprob(model, tok, [r]).item() for r in TURN_1]
    stack = EditStack([editor.edit(model, tok, TURN_1[0])])
    stack.apply(model)
    try:
        assert target_logprob(model, tok, [TURN_1[0]]).item() > base[0] + 0.1
        for i, req in enumerate(TURN_1[1:], 1):
            stack.push(editor.edit(model, tok, req, history=stack), model)
            assert target_logprob(model, tok, [req]).item() > base[i] + 0.1
        assert target_logprob(model, tok, [TURN_1[0]]).item() > base[0]
        counts = [next(iter(e.stats.values())).count for e in stack.edits]
        assert counts == sorted(counts) and len(set(counts)) == 3, "the statistics accumulate over the turns"
    finally:
        stack.restore(model)


def test_single_token_answer_first_turn_is_finite():
    """One answer token in the first turn: the official unbiased variance would be NaN."""
    model, tok = tiny()
    req = {"prompt": "The capital city of France", "subject": "France", "target_new": "is"}
    edit = UltraEdit(**SETTINGS).edit(model, tok, req)
    assert edit.info["n_tokens"] == 1
    assert all(torch.isfinite(m.std).all() for m in edit.stats.values())
    assert all(torch.isfinite(edit.delta(n)).all() for n in edit.names)

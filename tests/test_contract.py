"""The contract every registered editor must pass, on tiny models of several families.

Parametrized over every name in ``kedit.editors.EDITORS`` (an editor added to the registry
is tested automatically) and over tiny ``gpt2`` (Conv1D weights), ``llama`` and ``gpt_neox``
models from :func:`kedit.testing.tiny_model`, plus ROME, MEMIT and AlphaEdit with kedit's
``edit_aware`` variant on ``llama``.

Settings: ``tests/contract_settings.py`` (:func:`paper_editor`: the papers' algorithms scaled
for tiny models; an editor it does not name runs with ``cls()``'s defaults). The tiny models
are initialized with a larger weight scale (``initializer_range=0.2``): at the default 0.02 a
3-block model's logits stay within about ±0.6, so no edit could make a target likely. The
prompts end with the subject, so the subject's last token is where the prediction is read:
a random model has no attention head that carries the subject forward, as trained ones do.

An editor whose module does not exist yet is skipped (only when the ImportError is for that
very module; any other import error fails).

Checks: ``edit()`` is pure (state dict bit-exact; ``requires_grad`` flags, ``.grad``,
train/eval mode and forward hooks unchanged); applying raises log P(target_new) of every
request, by at least ``MIN_GAIN`` nats on average;
``restore`` is bit-exact; ``applied()`` restores also on an exception; applying twice raises
:class:`EditStateError`; save/load round-trips (same post-edit logits); a weight edit refuses
a different model (:class:`EditMismatchError`); a 3-edit sequential :class:`EditStack`
restores bit-exactly; one request (a plain dict) and a batch both work.
Plus edge cases of :mod:`kedit.editors.base` itself (bf16 restore, orientation, headers).
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from kedit.data import encode
from kedit.data.encode import target_logprobs
from kedit.editors import EDITORS, Edit, EditMismatchError, EditStack, WeightDelta
from kedit.editors.base import EditStateError, base_identity, editor_class
from kedit.identity import weights_digest
from kedit.models import arch_of
from kedit.testing import tiny_model
from conftest import assert_state_equal
from contract_settings import CONTRACT, PAPER, contract_editor, paper_editor

FAMILIES = ["gpt2", "llama", "gpt_neox"]
INIT = 0.2
"""Weight scale of the tiny models (see the module docstring)."""
MIN_GAIN = 0.25
"""Least mean rise of log P(target_new) (nats) an edit of ``REQUESTS`` must bring."""

REQUESTS = [
    {"prompt": "The capital city of France", "subject": "France", "target_new": "is Rome",
     "target_true": "is Paris"},
    {"prompt": "The sport of Michael Jordan", "subject": "Michael Jordan", "target_new": "is soccer",
     "target_true": "is basketball"},
    {"prompt": "The city of the Eiffel Tower", "subject": "the Eiffel Tower", "target_new": "is Berlin",
     "target_true": "is Paris"},
]


def tiny(family: str, seed: int = 0):
    return tiny_model(family, seed, initializer_range=INIT)


def load_editor_class(name: str):
    module = EDITORS[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            pytest.skip(f"editor {name!r}: its module {module} does not exist yet")
        raise
    return editor_class(name)


def make_editor(name: str, variant: str, model, tok):
    cls = load_editor_class(name)
    if variant == "edit_aware":
        return contract_editor(name, model, tok)
    return paper_editor(name, model, tok) if name in PAPER else cls()


CASES = [(e, "paper", f) for e in sorted(EDITORS) for f in FAMILIES] + [
    (e, "edit_aware", "llama") for e in sorted(CONTRACT)]


def target_logprob(model, tok, requests=REQUESTS) -> torch.Tensor:
    """Summed log P(target_new | prompt) per request."""
    seq2seq = arch_of(model).encoder_decoder
    batch = encode(tok, [r["prompt"] for r in requests], [r["target_new"] for r in requests], seq2seq=seq2seq,
                   device=model.device)  # $KEDIT_TEST_DEVICE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if seq2seq:
        inputs["labels"] = batch["labels"]
    with torch.no_grad():
        logits = model(**inputs).logits
    return target_logprobs(logits, batch["labels"], seq2seq)[0]


def logits(model, tok) -> torch.Tensor:
    batch = encode(tok, [r["prompt"] for r in REQUESTS], device=model.device)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def snapshot(model) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad is None for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "params": {n: id(p) for n, p in model.named_parameters()},
    }


def assert_untouched(model, snap: dict) -> None:
    assert_state_equal(model, snap["state"])
    now = snapshot(model)
    for key in ("requires_grad", "grad", "training", "hooks", "params"):
        assert now[key] == snap[key], f"edit() changed the model's {key}"


@pytest.fixture(scope="module", params=CASES,
                ids=lambda p: f"{p[0]}-{p[2]}" + ("" if p[1] == "paper" else f"-{p[1]}"))
def case(request):
    """One editor on one tiny model: the batch edit is computed once, with the purity evidence."""
    name, variant, family = request.param
    model, tok = tiny(family)
    # a mix of trainable flags, so an editor that resets them is caught
    model.get_input_embeddings().weight.requires_grad_(False)
    first = encode(tok, [r["prompt"] for r in REQUESTS], [r["target_new"] for r in REQUESTS],
                   device=model.device)  # $KEDIT_TEST_DEVICE
    with torch.no_grad():
        out = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    rows = torch.arange(len(REQUESTS), device=model.device)
    top = out[rows, first["prompt_len"] - 1].argmax(-1)
    assert (top != first["labels"][rows, first["prompt_len"]]).all(), "the tiny model already predicts a target"
    editor = make_editor(name, variant, model, tok)
    snap = snapshot(model)
    lp0 = target_logprob(model, tok)
    edit = editor.edit(model, tok, REQUESTS)
    after = snapshot(model)
    return SimpleNamespace(name=name, family=family, model=model, tok=tok, editor=editor, snap=snap,
                           after=after, lp0=lp0, edit=edit)


def test_edit_is_pure(case):
    assert isinstance(case.edit, Edit)
    for key in case.snap:
        if key == "state":
            for k, v in case.snap["state"].items():
                assert torch.equal(case.after["state"][k], v), f"edit() changed {k}"
        else:
            assert case.after[key] == case.snap[key], f"edit() changed the model's {key}"
    assert_untouched(case.model, case.snap)


def test_apply_raises_target_and_restores_exactly(case):
    model = case.model
    with case.edit.applied(model):
        assert case.edit.is_applied
        lp1 = target_logprob(model, case.tok)
    assert not case.edit.is_applied
    assert_untouched(model, case.snap)
    assert (lp1 > case.lp0).all() and (lp1 - case.lp0).mean() > MIN_GAIN, \
        f"log P(target) {case.lp0.tolist()} -> {lp1.tolist()}"


def test_applied_restores_on_exception(case):
    with pytest.raises(KeyError, match="boom"):
        with case.edit.applied(case.model):
            raise KeyError("boom")
    assert_untouched(case.model, case.snap)


def test_apply_twice_raises(case):
    case.edit.apply(case.model)
    try:
        with pytest.raises(EditStateError):
            case.edit.apply(case.model)
    finally:
        case.edit.restore(case.model)
    assert_untouched(case.model, case.snap)


def test_save_load_round_trip(case, tmp_path):
    path = case.edit.save(tmp_path / "edit.safetensors")
    loaded = Edit.load(path, model=case.model)
    assert type(loaded) is type(case.edit)
    with case.edit.applied(case.model):
        want = logits(case.model, case.tok)
    with loaded.applied(case.model):
        got = logits(case.model, case.tok)
    assert_untouched(case.model, case.snap)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_weight_edit_refuses_other_model(case, tmp_path):
    if not isinstance(case.edit, WeightDelta):
        pytest.skip(f"{case.name} makes a {type(case.edit).__name__}, not a weight edit")
    other, _ = tiny(case.family, seed=1)
    path = case.edit.save(tmp_path / "edit.safetensors")
    with pytest.raises(EditMismatchError):
        Edit.load(path, model=other)
    with pytest.raises(EditMismatchError):
        case.edit.apply(other)
    assert not case.edit.is_applied


def test_single_request_as_dict(case):
    one = REQUESTS[0]
    edit = case.editor.edit(case.model, case.tok, one)
    assert_untouched(case.model, case.snap)
    lp0 = target_logprob(case.model, case.tok, [one])
    with edit.applied(case.model):
        lp1 = target_logprob(case.model, case.tok, [one])
    assert lp1.item() > lp0.item()
    assert_untouched(case.model, case.snap)


def test_sequential_stack_restores_exactly(case):
    model, tok = case.model, case.tok
    stack = EditStack()
    stack.push(case.editor.edit(model, tok, REQUESTS[0]))
    stack.apply(model)
    try:
        for req in REQUESTS[1:]:
            before = target_logprob(model, tok, [req])
            edit = case.editor.edit(model, tok, req)  # computed on the model with the earlier edits
            stack.push(edit, model)
            assert target_logprob(model, tok, [req]).item() > before.item()
        assert stack.is_applied and len(stack.edits) == 3
    finally:
        stack.restore(model)
    assert not stack.is_applied
    assert_untouched(model, case.snap)


# --------------------------------------------------------------------------- base.py edge cases


def _delta_for(model, family: str, scale: float = 1e-3, seed: int = 0) -> WeightDelta:
    arch = arch_of(model)
    names = [arch.mlp_out_weight(0), arch.mlp_out_weight(1)]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    return WeightDelta(dense={n: scale * torch.randn(params[n].shape, generator=g) for n in names},
                       base=base_identity(model, names), info={"family": family})


def test_bf16_restore_is_bit_exact():
    model, _ = tiny_model("llama")
    model = model.to(torch.bfloat16)
    snap = snapshot(model)
    edit = _delta_for(model, "llama", scale=3e-3)
    name = edit.names[0]
    w = dict(model.named_parameters())[name].detach().clone()
    d = edit.delta(name).to(w.device, torch.bfloat16)
    assert not torch.equal(w + d - d, w), "the test needs a delta whose subtraction would not restore"
    with edit.applied(model):
        assert not torch.equal(dict(model.named_parameters())[name], w)
    assert_untouched(model, snap)


def test_saving_applied_edit_is_refused(tmp_path):
    model, _ = tiny_model("llama")
    edit = _delta_for(model, "llama")
    with edit.applied(model):
        with pytest.raises(EditStateError):
            edit.save(tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()


def test_restore_before_apply_raises():
    model, _ = tiny_model("llama")
    with pytest.raises(EditStateError):
        _delta_for(model, "llama").restore(model)


def test_header_records_base_name_and_hash(tmp_path):
    model, _ = tiny_model("gpt2")
    edit = _delta_for(model, "gpt2")
    path = edit.save(tmp_path / "e.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["kedit"])
    assert header["kind"] == "weight_delta"
    base = header["meta"]["base"]
    assert base["name"] == "tiny-gpt2"
    params = dict(model.named_parameters())
    assert base["hash"] == weights_digest({n: params[n] for n in edit.names}) and base["digest"] == "bitsum"


def test_low_rank_factors_follow_storage_orientation():
    """A rank-1 (out, in) update u v^T changes a Conv1D (GPT-2) and a Linear output by u (v . x)."""
    for family in ("gpt2", "llama"):
        model, _ = tiny_model(family)
        arch = arch_of(model)
        module = model.get_submodule(arch.mlp_out_module(0))
        d_in, d_out = arch.mlp_dims(model, 0)
        u, v, x = (torch.randn(*shape, device=model.device) for shape in ((d_out, 1), (d_in, 1), (2, d_in)))
        name = arch.mlp_out_weight(0)
        edit = WeightDelta(factors={name: arch.low_rank_factors(u, v)}, base=base_identity(model, [name]))
        with torch.no_grad():
            y0 = module(x)
            with edit.applied(model):
                y1 = module(x)
        torch.testing.assert_close(y1 - y0, (x @ v) @ u.T, rtol=1e-4, atol=1e-5)


def test_stack_round_trip_and_rollback(tmp_path):
    model, _ = tiny_model("gpt_neox")
    snap = snapshot(model)
    first = _delta_for(model, "gpt_neox", seed=0)
    stack = EditStack([first])
    with stack.applied(model):
        second = _delta_for(model, "gpt_neox", seed=1)  # computed on the edited model
        stack.push(second, model)
        want = logits_any(model)
    assert_untouched(model, snap)
    loaded = Edit.load(stack.save(tmp_path / "stack.safetensors"), model=model)
    assert isinstance(loaded, EditStack) and len(loaded.edits) == 2
    with loaded.applied(model):
        torch.testing.assert_close(logits_any(model), want, rtol=0, atol=0)
    assert_untouched(model, snap)
    # the second edit does not fit the unedited model first: applying it out of order rolls back
    wrong = EditStack([first, _delta_for(model, "gpt_neox", seed=1), second])
    with pytest.raises(EditMismatchError):
        wrong.apply(model)
    assert not wrong.is_applied
    assert_untouched(model, snap)


def logits_any(model) -> torch.Tensor:
    ids = torch.arange(1, 9, device=model.device).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits

"""Edits that cannot go wrong silently: finite deltas, atomic apply, validated files,
prompts that fit the context, trained editors bound to their base model (issue 19)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kedit
from kedit.checkpoint import META_KEY, BaseModelMismatch, base_model_identity, load_artifact, read_artifact_meta
from kedit.data import RequestError
from kedit.data.encode import context_length
from kedit.editors.base import (
    Edit,
    EditFileError,
    Editor,
    EditStack,
    EditStateError,
    InvalidEditError,
    WeightDelta,
    base_identity,
    tensor_hash,
)
from kedit.editors.locate import unapplied
from kedit.editors.mend import MEND, MENDHparams, MENDNet, edited_weights
from kedit.models.arch import arch_of
from kedit.testing import tiny_model

from contract_settings import paper_editor

REQ = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snap) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def two_tensor_delta(model, transpose_second: bool = False) -> WeightDelta:
    """A dense edit of the MLP output projections of blocks 0 and 1 (applied in that order)."""
    arch = arch_of(model)
    names = [arch.mlp_out_weight(0), arch.mlp_out_weight(1)]
    params = dict(model.named_parameters())
    dense = {n: 1e-2 * torch.randn(params[n].shape) for n in names}
    if transpose_second:
        dense[names[1]] = dense[names[1]].T.contiguous()
    return WeightDelta(dense=dense, base=base_identity(model, names))


# --------------------------------------------------------------------------- 1. finite edits


def test_lora_on_fp16_model_makes_a_finite_edit():
    model, tok = tiny_model("llama")
    model = model.half()
    edit = kedit.editor("lora", num_steps=5, lr=1e-2, dropout=0.0).edit(model, tok, REQ)
    for name in edit.names:
        assert torch.isfinite(edit.delta(name)).all(), name
    with edit.applied(model):
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_editor_returning_nonfinite_delta_raises_naming_editor_and_tensor():
    @dataclass
    class NoHparams:
        pass

    class NaNEditor(Editor):
        name = "nan-test"
        Hparams = NoHparams

        def edit(self, model, tokenizer, requests):
            name = arch_of(model).mlp_out_weight(0)
            d = torch.zeros(model.get_parameter(name).shape)
            d[0, 0] = float("nan")
            return WeightDelta(dense={name: d}, base=base_identity(model, [name]))

    model, tok = tiny_model("llama")
    with pytest.raises(InvalidEditError, match=r"editor 'nan-test'.*model\.layers\.0\.mlp\.down_proj\.weight.*non-finite"):
        NaNEditor().edit(model, tok, REQ)


# --------------------------------------------------------------------------- 4. atomic apply


def test_applied_restores_when_second_tensor_has_transposed_shape(tmp_path):
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    edit = two_tensor_delta(model, transpose_second=True)
    loaded = Edit.load(edit.save(tmp_path / "e.safetensors"))
    for e in (edit, loaded):
        with pytest.raises(InvalidEditError, match="shape"), e.applied(model):
            pass
        assert not e.is_applied
        assert_untouched(model, snap)


def interrupt_at(monkeypatch, name: str) -> None:
    """Ctrl-C when any edit computes its delta of weight ``name``."""
    delta = WeightDelta.delta

    def interrupted(self, n):
        if n == name:
            raise KeyboardInterrupt
        return delta(self, n)

    monkeypatch.setattr(WeightDelta, "delta", interrupted)


def test_interrupt_during_apply_restores_the_tensors_already_applied(monkeypatch):
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    edit = two_tensor_delta(model)
    interrupt_at(monkeypatch, edit.names[1])
    with pytest.raises(KeyboardInterrupt):
        edit.apply(model)
    assert not edit.is_applied
    assert_untouched(model, snap)


def test_failed_push_leaves_the_bad_edit_out_of_the_stack():
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    stack = EditStack([two_tensor_delta(model)])
    with stack.applied(model):
        edited = snapshot(model)
        with pytest.raises(InvalidEditError):
            stack.push(two_tensor_delta(model, transpose_second=True), model)
        assert len(stack.edits) == 1
        assert_untouched(model, edited)
    assert_untouched(model, snap)


def delta_on(model, blocks=(0, 1), scale: float = 1e-2) -> WeightDelta:
    """A random low-rank edit of the MLP output projections of ``blocks``, made on the model as it is."""
    arch = arch_of(model)
    params = dict(model.named_parameters())
    names = [arch.mlp_out_weight(b) for b in blocks]
    factors = {n: (scale * torch.randn(params[n].shape[0], 2), torch.randn(params[n].shape[1], 2)) for n in names}
    return WeightDelta(factors=factors, base=base_identity(model, names))


def test_a_long_stack_holds_one_copy_per_weight_and_restores_bit_exactly():
    torch.manual_seed(0)
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    arch = arch_of(model)
    touched = {arch.mlp_out_weight(b) for b in (0, 1, 2)}
    one_copy = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in touched)
    stack = EditStack([delta_on(model)])
    stack.apply(model)
    states = [snapshot(model)]
    for i in range(200):
        stack.push(delta_on(model, blocks=(i % 3, (i + 1) % 3)), model)
        states.append(snapshot(model))
    assert stack._originals.nbytes == one_copy  # not 201 copies
    assert not any(e.saved for e in stack.edits)
    with pytest.raises(EditStateError, match="last first"):
        stack.edits[0].restore(model)
    assert_untouched(model, states[-1])
    while len(stack.edits) > 100:  # undo the last edits one at a time: each leaves the state before it
        states.pop()
        assert not stack.pop(model).is_applied
        assert_untouched(model, states[-1])
    stack.restore(model)  # the other 100 at once
    assert_untouched(model, snap)
    stack.apply(model)
    assert_untouched(model, states[-1])
    stack.restore(model)
    assert_untouched(model, snap)
    assert stack._originals.nbytes == 0 and not any(e.is_applied for e in stack.edits)


def test_unapplied_gives_the_model_before_the_stack_and_adds_it_back_bit_exactly():
    torch.manual_seed(0)
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    stack = EditStack()
    for i in range(5):
        edit = delta_on(model, blocks=(i % 2, 2))
        if stack.is_applied:
            stack.push(edit, model)
        else:
            stack.push(edit)
            stack.apply(model)
    edited = snapshot(model)
    with unapplied(model, stack.edits):  # the whole stack: its one copy of the weights
        assert_untouched(model, snap)
    assert_untouched(model, edited)
    with pytest.raises(EditStateError, match="last first"), unapplied(model, stack.edits[:3]):
        pass  # the first three while the last two stay: not the model before anything, refused
    assert_untouched(model, edited)
    stack.restore(model)
    alone = [delta_on(model, blocks=(0,))]  # edits applied on their own keep their own copies
    alone[0].apply(model)
    alone.append(delta_on(model, blocks=(0, 1)))
    alone[1].apply(model)
    edited = snapshot(model)
    with unapplied(model, alone):
        assert_untouched(model, snap)
    assert_untouched(model, edited)
    alone[1].restore(model)
    alone[0].restore(model)
    stack.restore(model)
    assert_untouched(model, snap)


def test_interrupt_during_a_push_leaves_the_stack_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model, _ = tiny_model("llama")
    stack = EditStack([delta_on(model, blocks=(2,))])
    stack.apply(model)
    edited = snapshot(model)
    edit = delta_on(model)
    interrupt_at(monkeypatch, edit.names[1])
    with pytest.raises(KeyboardInterrupt):
        stack.push(edit, model)
    monkeypatch.undo()
    assert not edit.is_applied and len(stack.edits) == 1
    assert_untouched(model, edited)
    stack.restore(model)
    assert stack._originals.nbytes == 0


# --------------------------------------------------------------------------- 6. validated files


def rewrite(path: Path, tensors=None, header=None, key: str = "kedit") -> None:
    """Write ``path`` again with other tensors and/or header (no checksum is recomputed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    old = load_file(str(path))
    save_file(old if tensors is None else tensors, str(path),
              metadata={key: json.dumps(header) if header is not None else meta[key]})


def header_of(path: Path, key: str = "kedit") -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[key])


@pytest.mark.parametrize("shape", [(), (1, 64)], ids=["0-d", "1xd"])
def test_broadcasting_delta_is_refused_at_apply_and_load(tmp_path, shape):
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    name = arch_of(model).mlp_out_weight(0)  # (32, 64)
    edit = WeightDelta(dense={name: torch.full(shape, 0.1)}, base=base_identity(model, [name]))
    with pytest.raises(InvalidEditError, match=r"has shape .* but the weight has shape \(32, 64\)"):
        edit.apply(model)
    assert not edit.is_applied
    assert_untouched(model, snap)
    path = edit.save(tmp_path / "e.safetensors")
    with pytest.raises(InvalidEditError, match="e.safetensors"):
        Edit.load(path, model=model)
    with pytest.raises(InvalidEditError, match="e.safetensors"):
        Edit.load(path).apply(model)
    assert_untouched(model, snap)


def test_flipped_data_byte_is_detected(tmp_path):
    model, _ = tiny_model("llama")
    path = two_tensor_delta(model).save(tmp_path / "e.safetensors")
    assert header_of(path)["sha256"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(EditFileError, match=r"e\.safetensors.*'sha256'.*corrupt"):
        Edit.load(path)


def test_nan_delta_in_file_is_refused_naming_file_and_tensor(tmp_path):
    model, _ = tiny_model("llama")
    path = two_tensor_delta(model).save(tmp_path / "e.safetensors")
    tensors = load_file(str(path))
    key = min(tensors)
    tensors[key][0, 0] = float("nan")
    header = header_of(path)
    header["sha256"] = tensor_hash(tensors)  # a consistent file whose content is bad
    rewrite(path, tensors, header)
    with pytest.raises(EditFileError, match=rf"e\.safetensors.*{key[len('dense.'):]}.*non-finite"):
        Edit.load(path)


def test_file_without_checksum_still_loads(tmp_path):
    model, _ = tiny_model("llama")
    path = two_tensor_delta(model).save(tmp_path / "e.safetensors")
    header = header_of(path)
    del header["sha256"]
    rewrite(path, header=header)
    snap = snapshot(model)
    with Edit.load(path, model=model).applied(model):
        pass
    assert_untouched(model, snap)


def _bad_headers():
    def drop(*keys):
        def f(h):
            node = h
            for k in keys[:-1]:
                node = node[k]
            del node[keys[-1]]
        return f

    def put(value, *keys):
        def f(h):
            node = h
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
        return f

    return {
        "unknown format": (put(2, "kedit_format"), "kedit_format"),
        "format as string": (put("1", "kedit_format"), "kedit_format"),
        "no format": (drop("kedit_format"), "kedit_format"),
        "empty base": (put({}, "meta", "base"), "meta.base"),
        "no base": (drop("meta", "base"), "meta.base"),
        "base hash missing": (drop("meta", "base", "hash"), "meta.base.hash"),
        "base as list": (put(["x"], "meta", "base"), "meta.base"),
        "meta as string": (put("x", "meta"), "meta"),
        "info as list": (put([], "meta", "info"), "meta.info"),
        "kind as int": (put(3, "kind"), "kind"),
        "unknown kind": (put("nosuch", "kind"), "kind"),
    }


@pytest.mark.parametrize("case", list(_bad_headers()))
def test_malformed_header_names_file_and_field(tmp_path, case):
    mutate, field = _bad_headers()[case]
    model, _ = tiny_model("llama")
    path = two_tensor_delta(model).save(tmp_path / "e.safetensors")
    header = header_of(path)
    mutate(header)
    rewrite(path, header=header)
    with pytest.raises(EditFileError, match=rf"e\.safetensors.*{field}"):
        Edit.load(path)


def test_malformed_stack_header_names_the_sub_edit(tmp_path):
    model, _ = tiny_model("llama")
    path = EditStack([two_tensor_delta(model)]).save(tmp_path / "s.safetensors")
    header = header_of(path)
    header["meta"]["edits"][0]["meta"]["base"] = {}
    rewrite(path, header=header)
    with pytest.raises(EditFileError, match=r"s\.safetensors.*meta\.edits\[0\].*meta\.base"):
        Edit.load(path)
    header["meta"]["edits"] = "x"
    rewrite(path, header=header)
    with pytest.raises(EditFileError, match=r"s\.safetensors.*meta\.edits"):
        Edit.load(path)


def test_edit_without_base_cannot_be_saved(tmp_path):
    model, _ = tiny_model("llama")
    edit = two_tensor_delta(model)
    edit.base = {}
    with pytest.raises(InvalidEditError, match="base"):
        edit.save(tmp_path / "e.safetensors")


def small_mend(model) -> MEND:
    hp = MENDHparams(num_last_layers=1, rank=4)
    net = MENDNet(hp, {n: tuple(model.get_parameter(n).shape) for n in edited_weights(model, hp)})
    return MEND(hp, net=net.eval(), base=base_model_identity(model))


@pytest.mark.parametrize("hparams, field", [({"bogus": 1}, "bogus"), ({"rank": "four"}, "rank")],
                         ids=["unknown", "mistyped"])
def test_mend_artifact_with_bad_hyperparameters_is_refused(tmp_path, hparams, field):
    model, _ = tiny_model("llama")
    path = small_mend(model).save(tmp_path / "mend.safetensors")
    header = header_of(path, META_KEY)
    header["hparams"].update(hparams)
    rewrite(path, header=header, key=META_KEY)
    with pytest.raises(EditFileError, match=rf"mend\.safetensors.*hparams.*{field}"):
        kedit.load_editor(path)


@pytest.mark.parametrize("case", ["no hparams", "base as list", "unknown format", "dims missing", "not an object"])
def test_malformed_artifact_header_names_file_and_field(tmp_path, case):
    model, _ = tiny_model("llama")
    path = small_mend(model).save(tmp_path / "mend.safetensors")
    header = header_of(path, META_KEY)
    if case == "no hparams":
        del header["hparams"]
        field = "hparams"
    elif case == "base as list":
        header["base"] = []
        field = "base"
    elif case == "unknown format":
        header["format"] = 7
        field = "format"
    elif case == "dims missing":
        del header["extra"]["dims"]
        field = "dims"
    else:
        header = 5
        field = META_KEY
    rewrite(path, header=header, key=META_KEY)
    with pytest.raises(EditFileError, match=rf"mend\.safetensors.*{field}"):
        kedit.load_editor(path)


def test_artifact_checksum_detects_flipped_byte(tmp_path):
    model, _ = tiny_model("llama")
    path = small_mend(model).save(tmp_path / "mend.safetensors")
    assert read_artifact_meta(path)["sha256"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EditFileError, match="sha256"):
        kedit.load_editor(path)


@pytest.mark.parametrize("name", ["mend-smollm2-135m-counterfact", "serac-smollm2-135m-counterfact"])
def test_shipped_artifacts_without_checksum_load(name):
    path = CHECKPOINTS / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} not in this checkout")
    tensors, meta = load_artifact(path)
    assert "sha256" not in meta and tensors
    if name.startswith("mend"):
        assert isinstance(kedit.load_editor(path), MEND)


# --------------------------------------------------------------------------- 8. context length


def test_context_length_from_config_else_tokenizer():
    model, tok = tiny_model("gpt2")
    assert context_length(model, tok) == 128  # n_positions
    model, tok = tiny_model("t5")
    assert context_length(model, tok) is None  # relative positions, tokenizer without a limit
    assert context_length(model, SimpleNamespace(model_max_length=64)) == 64


def test_request_longer_than_context_is_refused_before_compute(monkeypatch):
    from kedit.editors import rome

    def heavy(*args, **kwargs):
        raise AssertionError("the editor started computing")

    monkeypatch.setattr(rome, "context_templates", heavy)
    model, tok = tiny_model("llama")  # 128 positions
    long = dict(REQ, prompt="The capital of France " + "and France " * 200 + "is")
    with pytest.raises(RequestError, match=r"record 0, field 'prompt'.*context of 128 tokens"):
        kedit.editor("rome").edit(model, tok, long)


# --------------------------------------------------------------------------- 9. base of learned editors


def trained_serac(tmp_path, model) -> Path:

    editor = paper_editor("serac", model)
    return editor.save_artifact(tmp_path / "serac.safetensors", base=base_model_identity(model))


def test_serac_loaded_without_model_refuses_another_base_at_edit(tmp_path):
    model, tok = tiny_model("llama")
    editor = kedit.load_editor(trained_serac(tmp_path, model))  # no model= given
    editor.edit(model, tok, REQ)
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(BaseModelMismatch, match="trained for base model"):
        editor.edit(other, tok, REQ)
    gpt2, gpt2_tok = tiny_model("gpt2")
    with pytest.raises(BaseModelMismatch):
        editor.edit(gpt2, gpt2_tok, REQ)


def test_serac_memory_refuses_to_route_another_base_through_a_trained_editor(tmp_path):

    model, tok = tiny_model("llama")
    trained = kedit.load_editor(trained_serac(tmp_path, model))
    other, _ = tiny_model("llama", seed=1)
    memory = paper_editor("serac", other, tok).edit(other, tok, REQ)
    memory.editor = trained  # a memory answered by an editor trained for another base
    with pytest.raises(BaseModelMismatch):
        memory.apply(other)
    assert not memory.is_applied
    assert "_kedit_serac_router" not in other.__dict__


def test_edit_of_another_model_is_a_base_mismatch_even_when_shapes_differ(tiny, tmp_path):
    """An edit made on one model (here a tiny GPT-2) onto another whose weights have other
    shapes names the two models (EditMismatchError), not a shape error."""
    from kedit.editors.base import EditMismatchError, WeightDelta, tensor_hash

    small, _ = tiny("llama")
    name = next(n for n, p in small.named_parameters() if p.ndim == 2)
    weight = dict(small.named_parameters())[name]
    other = {name: torch.zeros(weight.shape[0] + 1, weight.shape[1])}
    edit = WeightDelta(dense={name: torch.ones_like(other[name])},
                       base={"name": "another-model", "hash": tensor_hash(other)})
    with pytest.raises(EditMismatchError, match="computed on 'another-model'"):
        edit.apply(small)

"""kedit.identity: the cheap digest sees every change of a value, the full hash is opt-in, old
sha256 identities still verify, and one exception class covers every wrong-base failure."""

from __future__ import annotations

import pytest
import torch

from kedit import identity
from kedit.editors.base import WeightDelta, base_identity


def _weight(model):
    return next(n for n, p in model.named_parameters() if p.ndim == 2)


def _one_value_changed(model, name):
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        dict(other.named_parameters())[name][0, 0] += 1e-3
    return other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_digest_changes_with_any_single_value_and_not_otherwise(dtype):
    t = (torch.randn(5, 7) * 10).to(dtype)
    d0 = identity.weights_digest({"w": t})
    assert identity.weights_digest({"w": t.clone()}) == d0  # same bits, another tensor
    for i, j in [(0, 0), (4, 6), (2, 3)]:
        changed = t.clone()
        changed[i, j] = ~changed[i, j] if dtype == torch.bool else changed[i, j] + 1
        assert identity.weights_digest({"w": changed}) != d0, (dtype, i, j)


def test_digest_covers_names_dtypes_shapes_and_row_order():
    t = torch.randn(4, 6)
    d0 = identity.weights_digest({"w": t})
    assert identity.weights_digest({"v": t}) != d0
    assert identity.weights_digest({"w": t.double()}) != d0
    assert identity.weights_digest({"w": t.reshape(6, 4)}) != d0
    assert identity.weights_digest({"w": t[[1, 0, 2, 3]]}) != d0  # rows swapped
    vec = torch.randn(8)
    assert identity.weights_digest({"b": vec.flip(0)}) != identity.weights_digest({"b": vec})
    assert identity.weights_digest({"s": torch.tensor(1.5)}) != identity.weights_digest({"s": torch.tensor(2.5)})


def test_identity_is_cheap_by_default_and_full_on_request(tiny, monkeypatch):
    model, _ = tiny("llama")
    name = _weight(model)
    monkeypatch.delenv("KEDIT_FULL_HASH", raising=False)
    cheap = identity.identity(model, [name])
    assert cheap["digest"] == identity.BITSUM and cheap["name"] == "tiny-llama"
    full = identity.identity(model, [name], full=True)
    assert "digest" not in full and full["hash"] == identity.tensor_hash({name: dict(model.named_parameters())[name]})
    monkeypatch.setenv("KEDIT_FULL_HASH", "1")
    assert identity.identity(model, [name]) == full


def test_apply_checks_without_a_full_hash(tiny, monkeypatch):
    """Applying an edit recorded with the cheap digest never runs sha256 over the weights (no
    host copy of every touched weight), and still refuses other weights."""
    model, _ = tiny("llama")
    name = _weight(model)
    edit = WeightDelta(dense={name: torch.full_like(dict(model.named_parameters())[name], 0.01)},
                       base=base_identity(model, [name]))

    def no_full_hash(tensors):
        raise AssertionError("apply hashed the weights with sha256")

    other = _one_value_changed(model, name)
    monkeypatch.setattr(identity, "tensor_hash", no_full_hash)
    with edit.applied(model):  # checked with the digest, applied
        assert model.get_parameter(name).sum() != other.get_parameter(name).sum()
    with pytest.raises(identity.EditMismatchError, match="computed on 'tiny-llama'"):
        edit.apply(other)


def test_an_old_sha256_identity_still_verifies(tiny):
    model, _ = tiny("gpt2")
    name = _weight(model)
    w = dict(model.named_parameters())[name]
    old = {"name": "tiny-gpt2", "hash": identity.tensor_hash({name: w})}  # what kedit wrote before the digest
    assert identity.matches(old, model, [name])[0]
    edit = WeightDelta(dense={name: torch.zeros_like(w)}, base=old)
    with edit.applied(model):
        pass
    with torch.no_grad():
        w[0, 0] += 1
    assert not identity.matches(old, model, [name])[0]
    with pytest.raises(ValueError, match="unknown weight digest"):
        identity.matches({**old, "digest": "md5"}, model, [name])


def test_weights_version_changes_on_in_place_writes_and_replacement(tiny):
    model, _ = tiny("llama")
    name = _weight(model)
    p = dict(model.named_parameters())[name]
    v0 = identity.weights_version(model, [name])
    assert identity.weights_version(model, [name]) == v0
    with torch.no_grad():
        p.add_(0.0)
    v1 = identity.weights_version(model, [name])
    assert v1 != v0
    p.data = p.data.clone()
    assert identity.weights_version(model, [name]) != v1


def test_fingerprint_sees_weights_and_foreign_hooks(tiny):
    model, _ = tiny("llama")
    fp = identity.fingerprint(model)
    handle = model.get_submodule("model.layers.0").register_forward_hook(lambda *a: None)
    assert identity.fingerprint(model) != fp
    handle.remove()
    assert identity.fingerprint(model) == fp
    assert identity.state_digest(model, full=True) == identity.tensor_hash(model.state_dict())


def test_config_key_names_the_model_and_follows_its_config(tiny):
    model, _ = tiny("llama")
    key = identity.config_key(model)
    assert key.startswith("tiny-llama-") and identity.config_key(tiny("llama")[0]) == key
    model.config.rms_norm_eps = model.config.rms_norm_eps * 2
    assert identity.config_key(model) != key


def test_one_exception_for_a_wrong_base():
    from kedit.checkpoint import BaseModelMismatch
    from kedit.editors import EditMismatchError

    assert BaseModelMismatch is EditMismatchError is identity.EditMismatchError

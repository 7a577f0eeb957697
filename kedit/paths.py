"""Where kedit finds its data, configs and cache: one module, one order.

Every lookup takes, in this order: an explicit argument, then an environment variable, then
what ships inside the package. Nothing is looked up relative to the current directory or to
the checkout's parent folder.

============== =============================================================== ==========================
variable       what                                                            default
============== =============================================================== ==========================
KEDIT_CACHE    dequantized models, covariance statistics, context templates,  ``~/.cache/kedit``
               datasets downloaded from the hub
KEDIT_CORPUS   text for the covariance statistics of ROME, MEMIT, AlphaEdit    the packaged Wikipedia
               (a file, a folder, or a Hugging Face dataset id)                sample (:data:`STATS_CORPUS`)
KEDIT_DATA     folder of the large benchmark files (``counterfact/``,          none: named datasets then
               ``zsre/``, ``knowedit/``, ``mquake/``, ``corpus/``)             come from the hub
============== =============================================================== ==========================

What ships (``kedit/resources``, sources and licences in its ``NOTICE.md``): a Wikipedia
sample for statistics, a disjoint one for perplexity, and 48 CounterFact records. The tuned
hyperparameters ship in ``kedit/configs`` (the checkout's top-level ``configs/`` is the same
folder).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
RESOURCES = PACKAGE / "resources"
CONFIGS = PACKAGE / "configs"

STATS_CORPUS = RESOURCES / "corpus" / "wikipedia_stats.jsonl"
"""Whole Wikipedia articles, about 40k SmolLM2 tokens: the default text for covariance statistics."""
HELD_TEXT = RESOURCES / "corpus" / "wikipedia_held.jsonl"
"""16 other Wikipedia articles (their first 4,000 characters): the default held text for perplexity."""
SAMPLE_RECORDS = RESOURCES / "counterfact_sample.json"
"""48 CounterFact records (ROME schema), for the demo and quick evaluations."""


class DataNotFound(FileNotFoundError):
    """A data location that kedit was told to use, or needs, does not exist."""


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """kedit's cache folder: ``path``, else ``$KEDIT_CACHE``, else ``~/.cache/kedit``."""
    if path is not None:
        return Path(path).expanduser()
    env = _env("KEDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kedit"


def data_dir(path: str | os.PathLike | None = None, *, required: bool = False) -> Path | None:
    """The folder of the large benchmark files: ``path``, else ``$KEDIT_DATA``, else None.

    With ``required=True`` a missing folder is an error that says how to name one.
    """
    chosen = Path(path).expanduser() if path is not None else None
    if chosen is None and _env("KEDIT_DATA"):
        chosen = Path(_env("KEDIT_DATA")).expanduser()
    if chosen is not None and not chosen.is_dir():
        raise DataNotFound(f"the data folder {chosen} (from {'the argument' if path is not None else '$KEDIT_DATA'}) "
                           f"does not exist")
    if chosen is None and required:
        raise DataNotFound("this needs the large benchmark data: set KEDIT_DATA to the folder that holds "
                           "counterfact/, zsre/, ... (for example KEDIT_DATA=/path/to/data)")
    return chosen


def stats_corpus(corpus: str | os.PathLike | None = None) -> str:
    """The corpus for covariance statistics: ``corpus``, else ``$KEDIT_CORPUS``, else the packaged sample."""
    if corpus is not None:
        return os.fspath(corpus)
    return _env("KEDIT_CORPUS") or str(STATS_CORPUS)


def held_text(path: str | os.PathLike | None = None) -> Path:
    """Held text for perplexity: ``path``, else the packaged Wikipedia sample (disjoint from
    :data:`STATS_CORPUS`)."""
    return Path(path).expanduser() if path is not None else HELD_TEXT


def configs_dir() -> Path:
    """The shipped hyperparameter and experiment YAMLs (``configs/<editor>/<name>.yaml``)."""
    return CONFIGS


SHARED_CONFIGS: dict[str, dict[str, str]] = {
    "rome": {"gemma2": "gptj", "mistral": "gptj", "qwen2": "gptj", "qwen3": "gptj"},
    "memit": {"mistral": "llama", "qwen2": "llama", "qwen3": "llama"},
    "alphaedit": {"qwen2": "mistral", "qwen3": "mistral"},
}
"""Per editor, the families whose tuned values are another family's (same layers, same settings):
one YAML serves them all, and its header says for which models its values were chosen."""


def shipped_config(editor: str, name: str) -> Path | None:
    """The shipped ``configs/<editor>/<name>.yaml``, or the one ``name`` shares (:data:`SHARED_CONFIGS`)."""
    editor = editor.lower()
    name = SHARED_CONFIGS.get(editor, {}).get(name, name)
    path = CONFIGS / editor / f"{name}.yaml"
    return path if name and path.is_file() else None


def tuned_config(editor: str, model=None, model_name: str | None = None) -> Path | None:
    """The shipped YAML of tuned hyperparameters for ``editor`` on a model: the one named after
    the model (``configs/<editor>/<model name>.yaml``) first, then the one of its family
    (``<config.model_type>.yaml``, or the one it shares); None when neither exists (the papers'
    values apply)."""
    if model_name is None and model is not None:
        model_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    stems = [Path(model_name).name if model_name else "",
             getattr(getattr(model, "config", None), "model_type", "") or ""]
    for stem in stems:
        found = shipped_config(editor, stem)
        if found is not None:
            return found
    return None


def config_path(editor: str, config: str | os.PathLike) -> Path:
    """A config given by path, or by the name of a shipped one (``"llama"`` -> ``configs/<editor>/llama.yaml``)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = shipped_config(editor, path.name.removesuffix(".yaml"))
    if path.parent == Path(".") and shipped is not None:
        return shipped
    shared = SHARED_CONFIGS.get(editor.lower(), {})
    names = sorted([*(p.stem for p in (CONFIGS / editor.lower()).glob("*.yaml")), *shared])
    raise DataNotFound(f"no config file at {path}" + (f"; shipped configs of {editor}: {', '.join(names)}"
                                                       if names else ""))


def hub_unreachable(repo: str, revision: str | None = "main", repo_type: str = "dataset",
                    timeout: float = 5.0) -> str | None:
    """None when the Hugging Face hub answers for ``repo``; else a one-line reason (offline mode,
    no network, unknown id). One request with a short timeout, no retries: kedit asks this before
    handing a hub id to ``datasets`` or ``transformers``, whose retries take tens of seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = api.model_info if repo_type == "model" else api.dataset_info
        info(repo, revision=revision, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - any failure is the reason
        return one_line(err)
    return None


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

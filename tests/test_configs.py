"""Shipped hyperparameter configs: one YAML per distinct set of values, every family still finds its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kedit import paths

# Families with tuned values before configs shared files (kedit.paths.SHARED_CONFIGS).
FAMILIES = ["gemma2", "gemma3_text", "gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3"]
LOCATE = ["rome", "memit", "alphaedit"]


def _model(model_type: str, name: str = ""):
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type, _name_or_path=name))


@pytest.mark.parametrize("editor", LOCATE)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_resolves_to_a_config_that_parses(editor, family):
    from kedit.config import load_hparams
    from kedit.editors.base import editor_class

    path = paths.tuned_config(editor, _model(family))
    assert path is not None and path.is_file(), f"{editor}/{family}: no config"
    assert path == paths.config_path(editor, family)  # the same file by name (config="mistral")
    load_hparams(editor_class(editor).Hparams, path)


def test_shared_configs_point_at_files_and_replace_none():
    for editor, shared in paths.SHARED_CONFIGS.items():
        for family, target in shared.items():
            assert (paths.CONFIGS / editor / f"{target}.yaml").is_file(), f"{editor}: {family} -> {target}"
            assert not (paths.CONFIGS / editor / f"{family}.yaml").exists(), f"{editor}/{family}.yaml shadows the share"


def test_no_two_shipped_configs_of_an_editor_hold_the_same_values():
    import yaml

    for editor in LOCATE:
        seen: dict[str, str] = {}
        for path in sorted((paths.CONFIGS / editor).glob("*.yaml")):
            values = repr(sorted(yaml.safe_load(path.read_text()).items()))
            assert values not in seen, f"{path.name} repeats {seen.get(values)}: share it (SHARED_CONFIGS)"
            seen[values] = path.name


def test_a_model_named_config_wins_over_its_family_and_unknown_families_get_none():
    assert paths.tuned_config("ft-m", _model("llama"), "smollm2-135m") == paths.CONFIGS / "ft-m" / "smollm2-135m.yaml"
    assert paths.tuned_config("rome", _model("t5")) is None
    with pytest.raises(FileNotFoundError, match="shipped configs of rome: .*qwen2"):
        paths.config_path("rome", "no-such-config")


def test_editor_auto_config_for_a_shared_family():
    import kedit

    rome = kedit.editor("rome", config="auto", model=_model("qwen2"))
    assert rome.hparams.layers == [5]  # rome/gptj.yaml
    assert [list(t) for t in rome.hparams.templates] == [[5, 10], [10, 10]]
    memit = kedit.editor("memit", config="mistral")
    assert memit.hparams.layers == [4, 5, 6, 7, 8] and memit.hparams.clamp_norm_factor == 0.75  # memit/llama.yaml

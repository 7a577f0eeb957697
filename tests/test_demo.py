"""The demo's plumbing on a tiny model saved as a local folder (the real run is `make demo`)."""

from __future__ import annotations

import pytest
from kedit import demo, paths
from kedit.editors import Edit
from kedit.testing import tiny_model


@pytest.fixture
def tiny_folder(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return str(tmp_path)


def table(out: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, row cells) of the demo's answer table in its printed output."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if [c.strip() for c in line.split("|")[1:2]] == ["prompt"])
    cells = [[c.strip() for c in line.split("|")] for line in lines[at + 2:] if "|" in line]
    return [c.strip() for c in lines[at].split("|")], cells


def test_demo_answers_only(tiny_folder, capsys):
    """``--editor none``: one row per prompt with the model's own greedy answer, and no edited columns."""
    from kedit.models import load_model

    assert demo.main(["--model", tiny_folder, "--editor", "none", "--max-new-tokens", "2"]) == 0
    header, rows = table(capsys.readouterr().out)
    assert header == ["", "prompt", "answer"]
    prompts = [demo.EDIT_PROMPT, *demo.PARAPHRASES, *demo.NEIGHBOURS]
    assert [r[1] for r in rows] == prompts
    model, tok = load_model(tiny_folder)
    assert [r[2] for r in rows] == demo.answers(model, tok, prompts, 2)


def test_demo_edit_applied_then_restored(tiny_folder, capsys, monkeypatch):
    class AlwaysRome(Edit):
        """A stand-in editor's edit: the LM head adds a large logit to " Rome"."""

        def __init__(self, token: int):
            self.token, self.handle = token, None

        def apply(self, model):
            def hook(_module, _args, logits):
                logits[..., self.token] += 1e4
                return logits

            self.handle = model.lm_head.register_forward_hook(hook)

        def restore(self, model):
            self.handle.remove()

    def fake_edit(model, tokenizer, editor_name, request, config=None):
        assert editor_name == "rome" and request["target_new"] == "Rome"
        assert config == paths.CONFIGS / "rome" / f"{model.config.model_type}.yaml"  # the family's config
        (rome,) = tokenizer(" Rome", add_special_tokens=False)["input_ids"]
        return AlwaysRome(rome)

    monkeypatch.setattr(demo, "make_edit", fake_edit)
    demo.main(["--model", tiny_folder, "--target-new", "Rome", "--max-new-tokens", "3", "--eval-records", "0"])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith(" ") and "edited" in line)
    assert [c.strip() for c in header.split("|")] == ["", "prompt", "answer", "edited", "restored"]
    rows = [[c.strip() for c in line.split("|")] for line in lines
            if line.startswith(("edit ", "neighbour")) and "|" in line]
    assert len(rows) == 1 + len(demo.NEIGHBOURS)
    for _, _, before, after, restored in rows:
        assert after == "Rome Rome Rome" and restored == before  # the edit shows, restore is exact


def test_unavailable_editor(tiny_folder, capsys, monkeypatch):
    def missing(*args):
        raise ImportError("No module named 'kedit.editors.nope'")

    monkeypatch.setattr(demo, "make_edit", missing)
    demo.main(["--model", tiny_folder, "--editor", "nope", "--max-new-tokens", "1"])
    out = capsys.readouterr().out
    assert "editor 'nope' is not available" in out
    header, rows = table(out)
    assert header == ["", "prompt", "answer"] and len(rows) == 1 + len(demo.PARAPHRASES) + len(demo.NEIGHBOURS)


def test_format_table():
    rows = [demo.Row("edit", "A is in", "Paris", "Rome", "Paris"), demo.Row("neighbour", "B is", "x")]
    lines = demo.format_table(rows).splitlines()
    assert len(lines) == 4 and set(lines[1]) <= {"-", "+"}
    assert [c.strip() for c in lines[2].split("|")] == ["edit", "A is in", "Paris", "Rome", "Paris"]
    assert [c.strip() for c in lines[3].split("|")] == ["neighbour", "B is", "x", "", ""]


def test_demo_evaluation_table():
    """The table comes from the records that ship with kedit: 2 requests, pre and post scores."""
    model, tok = tiny_model("llama")
    table = demo.evaluation_table(model, tok, "ft-m", None, 2, paths.tuned_config("ft-m", model))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in table.splitlines() if line.startswith("| rewrite/")}
    assert {"rewrite/es", "rewrite/acc", "rewrite/gen"} <= set(rows)
    for pre, post, n in rows.values():
        assert n == "2" and 0 <= float(pre) <= 1 and 0 <= float(post) <= 1  # two records, pre and post


def test_demo_evaluation_table_without_data(tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(FileNotFoundError):
        demo.evaluation_table(model, tok, "ft-m", str(tmp_path / "missing.json"), 2)


def test_editor_config(tiny):
    """``auto`` takes the shipped config of the model (by name, then family), else defaults."""
    model, _ = tiny("llama")
    assert demo.editor_config("rome", model, "some/folder") == paths.CONFIGS / "rome" / "llama.yaml"
    assert demo.editor_config("ft-m", model, "smollm2-135m") == paths.CONFIGS / "ft-m" / "smollm2-135m.yaml"
    assert demo.editor_config("rome", model, "x", "none") is None
    assert demo.editor_config("rome", model, "x", "llama") == paths.CONFIGS / "rome" / "llama.yaml"
    with pytest.raises(FileNotFoundError, match="shipped configs of rome: .*llama"):
        demo.editor_config("rome", model, "x", "my.yaml")
    assert demo.editor_config("mend", model, "x") is None  # MEND's configs are training configs of other names

"""kedit works anywhere: from a fresh copy of the repository or an installed wheel, with
nothing beside it. Data locations come from one module (kedit.paths), named datasets from
one table (kedit.data.named), and the hub is never asked silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kedit import paths
from kedit.data import load_requests
from kedit.data import named
from kedit.data.named import DatasetUnavailable, Hub, NamedDataset

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- kedit.paths


def test_paths_order_argument_then_environment_then_package(monkeypatch, tmp_path):
    for var in ("KEDIT_CACHE", "KEDIT_CORPUS", "KEDIT_DATA"):
        monkeypatch.delenv(var, raising=False)
    assert paths.cache_dir() == Path.home() / ".cache" / "kedit"
    assert paths.stats_corpus() == str(paths.STATS_CORPUS) and paths.held_text() == paths.HELD_TEXT
    assert paths.data_dir() is None
    with pytest.raises(paths.DataNotFound, match="set KEDIT_DATA"):
        paths.data_dir(required=True)

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("KEDIT_CORPUS", str(tmp_path / "corpus.txt"))
    monkeypatch.setenv("KEDIT_DATA", str(tmp_path))
    assert paths.cache_dir() == tmp_path / "c" and paths.stats_corpus() == str(tmp_path / "corpus.txt")
    assert paths.data_dir() == tmp_path

    assert paths.cache_dir(tmp_path / "x") == tmp_path / "x"  # an argument beats the environment
    assert paths.stats_corpus("my/corpus") == "my/corpus" and paths.held_text("h.txt") == Path("h.txt")
    monkeypatch.setenv("KEDIT_DATA", str(tmp_path / "missing"))
    with pytest.raises(paths.DataNotFound, match="missing.*KEDIT_DATA.*does not exist"):
        paths.data_dir()


def test_packaged_data_is_there_and_small():
    """The corpus, the disjoint held text, the records and their notice ship in the package."""
    stats = [json.loads(line) for line in paths.STATS_CORPUS.read_text(encoding="utf-8").splitlines()]
    held = [json.loads(line) for line in paths.HELD_TEXT.read_text(encoding="utf-8").splitlines()]
    assert not {r["title"] for r in stats} & {r["title"] for r in held}  # disjoint
    assert sum(len(r["text"].split()) for r in stats) > 20_000  # more than the default 20k tokens' words
    notice = (paths.RESOURCES / "NOTICE.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in notice and "MIT" in notice
    assert all(r["title"] in notice for r in stats + held)  # attribution of every article
    requests = load_requests("counterfact-sample")
    assert len(requests) == 48 and all(r.neighborhood and r.paraphrase_prompts for r in requests)
    size = sum(p.stat().st_size for p in paths.RESOURCES.rglob("*") if p.is_file())
    assert size < 1_000_000, f"packaged data is {size:,} bytes"


def test_tuned_configs_by_model_name_then_family(tiny):
    import kedit

    model, _ = tiny("llama")
    assert paths.tuned_config("rome", model) == paths.CONFIGS / "rome" / "llama.yaml"
    assert paths.tuned_config("ft-m", model, "smollm2-135m") == paths.CONFIGS / "ft-m" / "smollm2-135m.yaml"
    assert paths.tuned_config("rome", model_name="unknown-model") is None
    rome = kedit.editor("rome", config="auto", model=model)
    assert rome.hparams.fit_templates and rome.hparams.v_stop_argmax  # configs/rome/llama.yaml
    assert kedit.editor("rome", config="llama").hparams == rome.hparams  # a shipped config by name
    general = kedit.editor("rome", config="llama-general").hparams  # the trade-off for paraphrases
    assert general.fit_templates and not general.v_stop_argmax and general.v_lr > rome.hparams.v_lr
    assert not kedit.editor("rome").hparams.fit_templates  # no config: the paper's values
    with pytest.raises(ValueError, match="model="):
        kedit.editor("rome", config="auto")


# --------------------------------------------------------------------------- named datasets


def _fake_dev_data(root: Path) -> Path:
    """A KEDIT_DATA folder holding a 3-record counterfact/counterfact_dev_rome.json."""
    records = json.loads(paths.SAMPLE_RECORDS.read_text(encoding="utf-8"))[:3]
    (root / "counterfact").mkdir(parents=True)
    (root / "counterfact" / "counterfact_dev_rome.json").write_text(json.dumps(records), encoding="utf-8")
    return root


def test_named_dataset_from_kedit_data(monkeypatch, tmp_path):
    monkeypatch.setenv("KEDIT_DATA", str(_fake_dev_data(tmp_path)))
    requests = load_requests("counterfact")  # default split: dev
    assert [r.case_id for r in requests] == [r.case_id for r in load_requests("counterfact-sample", limit=3)]
    assert load_requests("counterfact:dev", limit=2) == load_requests("counterfact", split="dev", limit=2)
    with pytest.raises(ValueError, match="no split 'test'.*dev, dev-mend"):
        load_requests("counterfact", split="test")
    with pytest.raises(ValueError, match="split='dev' applies to named datasets only"):
        load_requests(paths.SAMPLE_RECORDS, split="dev")


def test_named_dataset_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv("KEDIT_DATA", raising=False)
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable) as err:
        load_requests("counterfact")  # dev: local only
    assert "counterfact:dev" in str(err.value) and "KEDIT_DATA" in str(err.value)
    assert "pass the path of a local JSON/JSONL file" in str(err.value)
    with pytest.raises(DatasetUnavailable, match="hub is not reachable.*HF_HUB_OFFLINE") as err:
        load_requests("counterfact", split="all")
    assert "\n" not in str(err.value)


def test_named_dataset_from_the_hub_is_cached(monkeypatch, tmp_path):
    """The hub path, offline: a local `datasets` folder stands in for the hub repository. The
    records are cached, so a second load needs neither the hub nor `datasets`."""
    pytest.importorskip("datasets")
    repo = tmp_path / "repo"
    repo.mkdir()
    records = json.loads(paths.SAMPLE_RECORDS.read_text(encoding="utf-8"))[:4]
    (repo / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    monkeypatch.delenv("KEDIT_DATA", raising=False)
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(named.DATASETS, "counterfact", NamedDataset(
        "test", files={}, hub={"all": Hub(str(repo), revision="r1")}, default_split="all"))
    first = load_requests("counterfact")
    assert [r.case_id for r in first] == [r["case_id"] for r in records]
    cached = tmp_path / "cache" / "datasets" / "counterfact-all-r1.json"
    assert cached.is_file()
    shutil.rmtree(repo)  # the "hub" is gone: the cache answers
    assert load_requests("counterfact") == first


def test_hub_corpus_fails_fast(tiny, monkeypatch):
    from kedit.stats import second_moments

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny("llama")
    with pytest.raises(RuntimeError, match="hub is not reachable.*local corpus") as err:
        second_moments(model, tok, [0], "some-org/some-corpus", n_tokens=10, cache=False, progress=False)
    assert "\n" not in str(err.value)


def test_stats_default_to_the_packaged_corpus(tiny, monkeypatch, tmp_path):
    from kedit.stats import second_moments

    monkeypatch.delenv("KEDIT_CORPUS", raising=False)
    model, tok = tiny("llama")
    kw = dict(n_tokens=200, cache=False, progress=False)
    import torch

    assert torch.equal(second_moments(model, tok, [0], **kw)[0],
                       second_moments(model, tok, [0], paths.STATS_CORPUS, **kw)[0])


# --------------------------------------------------------------------------- a fresh copy, a wheel


def _tracked_copy(dest: Path) -> Path:
    """The files git tracks (symbolic links kept as links), copied into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KEDIT_DATA", "KEDIT_CORPUS", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return _tracked_copy(tmp_path_factory.mktemp("clone") / "kedit")


@pytest.mark.real_model
def test_fresh_copy_runs_demo_and_evaluate(fresh_copy, tmp_path, smollm2):
    """The tracked files alone, run from an unrelated folder with no ../shared and no KEDIT_DATA:
    the demo edits and restores, and `python -m kedit.evaluate` scores the packaged records."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env(PYTHONPATH=str(fresh_copy))
    run = dict(cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    probe = subprocess.run([sys.executable, "-c", "import kedit, kedit.paths as p; print(kedit.__file__, p.CONFIGS)"],
                           **run)
    assert probe.stdout.startswith(str(fresh_copy / "kedit")), probe.stdout + probe.stderr

    demo = subprocess.run([sys.executable, "-m", "kedit.demo", "--eval-records", "1", "--threads", "1"], **run)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert "edit: rome (configs/rome/llama.yaml)" in demo.stdout
    row = next(line for line in demo.stdout.splitlines() if line.startswith("edit ") and "|" in line)
    _, _, before, after, restored = [c.strip() for c in row.split("|")]
    assert before.startswith("Paris") and after.startswith("Rome") and restored == before
    assert "counterfact-sample" in demo.stdout and "| rewrite/es |" in demo.stdout

    out = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, "-m", "kedit.evaluate", "--editor", "ft-m", "--config", "auto",
                         "--data", "counterfact-sample", "--limit", "2", "--eval.fluency", "false",
                         "--eval.ppl_docs", "1",
                         "--quiet", "--threads", "1", "--out", str(out)], **run)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["data"] == "counterfact-sample" and result["summary"]["n"]["rewrite/es"] == 2
    assert result["summary"]["post"]["rewrite/es"] >= 0.5  # FT-M with the tuned config edits


def test_evaluate_named_data_offline_one_line(fresh_copy, tmp_path):
    env = _clean_env(PYTHONPATH=str(fresh_copy))
    res = subprocess.run([sys.executable, "-m", "kedit.evaluate", "--editor", "ft-m", "--data", "zsre"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "zsre:dev is not available here" in last and "Traceback" not in res.stderr


def test_wheel_carries_configs_corpus_and_records(fresh_copy, tmp_path):
    """`pip wheel . --no-deps` of a fresh copy holds every config and data file the package reads."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), "-q"], cwd=fresh_copy, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("kedit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for folder in (paths.CONFIGS, paths.RESOURCES)
               for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert "kedit/configs/rome/llama.yaml" in shipped and "kedit/resources/NOTICE.md" in shipped
    assert shipped <= names, sorted(shipped - names)


def test_training_configs_name_their_data(monkeypatch, tmp_path):
    """The tiny configs train on the packaged records; the SmolLM2 ones on a named split of the
    dev data, which without $KEDIT_DATA is one clear error before anything is built."""
    from kedit.lightning.common import DataFileError
    from kedit.lightning.data import EditDataModule

    EditDataModule.check_files("counterfact-sample")
    monkeypatch.delenv("KEDIT_DATA", raising=False)
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFileError, match="train_path: dataset counterfact:train is not available.*KEDIT_DATA"):
        EditDataModule.check_files("counterfact:train")
    monkeypatch.setenv("KEDIT_DATA", str(_fake_dev_data(tmp_path / "data")))
    EditDataModule.check_files("counterfact:dev")

"""Loading edit requests: every shipped file, every format, every kind of bad input."""

from __future__ import annotations

import collections
import json

import pytest

from kedit import paths
from kedit.data import EditRequest, Probe, RequestError, to_requests
from kedit.data.loaders import (
    LoadReport,
    detect_format,
    load_mquake_cases,
    load_requests,
    load_requests_with_report,
    nq_question,
    read_records,
)
from kedit.editors.base import as_requests

# file -> (format, records, loaded requests, skipped records by reason). The skips are data
# issues of the sources: zsRE/KnowEdit records whose new target equals the true one (not
# an edit), empty answers, and three KnowEdit zsRE subjects spelt differently in the prompt.
FILES = {
    "counterfact/counterfact_dev_rome.json": ("counterfact", 728, 728, {}),
    "counterfact/counterfact_dev_mend.json": ("counterfact_mend", 2000, 2000, {}),
    "counterfact/counterfact_train_mend.json": ("counterfact_mend", 11190, 11190, {}),
    "zsre/zsre_dev_mend.json": ("zsre_mend", 556, 539, {"same": 17}),
    "zsre/zsre_train_mend.json": ("zsre_mend", 999, 980, {"same": 17, "empty": 2}),
    "zsre/zsre_dev_knowedit.json": ("knowedit", 919, 876, {"same": 40, "subject": 3}),
    "knowedit/wiki_counterfact_train_cf.json": ("knowedit", 1428, 1419, {"same": 6, "empty": 3}),
    "mquake/MQuAKE-hard.json": ("mquake", 429, 4 * 429, {}),
}


def reason(err: RequestError) -> str:
    if "equals target_true" in err.reason:
        return "same"
    if "does not occur in prompt" in err.reason:
        return "subject"
    return err.reason


@pytest.mark.dev_data
def test_every_data_file_is_covered(data_dir):
    found = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*.json*")}
    corpus = {p for p in found if p.startswith("corpus/")}
    assert found - corpus == set(FILES)
    assert corpus == {"corpus/wikipedia_en_sample_00.jsonl", "corpus/wikipedia_en_sample_01.jsonl"}


@pytest.mark.dev_data
@pytest.mark.parametrize("name", FILES)
def test_data_file_loads(data_dir, name):
    fmt, n_records, n_loaded, skips = FILES[name]
    requests, report = load_requests_with_report(data_dir / name, on_error="skip")
    assert (report.format, report.records, report.loaded, len(requests)) == (fmt, n_records, n_loaded, n_loaded)
    assert dict(collections.Counter(reason(e) for e in report.skipped)) == skips
    for err in report.skipped:
        assert err.source == str(data_dir / name) and err.index is not None and err.field
    for r in requests:
        assert isinstance(r, EditRequest) and r.prompt and r.target_new and r.target_true
        assert r.target_new == r.target_new.strip() and r.target_new != r.target_true
        assert r.subject in r.prompt
        assert r.case_id is not None
    if skips:  # the default refuses bad records, naming the first one
        first = report.skipped[0]
        with pytest.raises(RequestError) as err:
            load_requests(data_dir / name)
        assert (err.value.index, err.value.field) == (first.index, first.field)
        assert f"record {first.index}" in str(err.value) and name in str(err.value)
    else:
        assert len(load_requests(data_dir / name)) == n_loaded


def test_counterfact_rome_fields():
    r = load_requests(paths.SAMPLE_RECORDS, limit=1)[0]  # the first record of counterfact_dev_rome.json
    assert r == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is", target_new="English",
        subject="Danielle Darrieux", target_true="French", case_id=0,
        paraphrase_prompts=r.paraphrase_prompts, neighborhood=r.neighborhood,
        generation_prompts=r.generation_prompts)
    assert r.template == "The mother tongue of {} is"
    assert len(r.paraphrase_prompts) == 2 and len(r.generation_prompts) == 10
    assert r.neighborhood[0] == Probe("The mother tongue of Léon Blum is", "French")
    assert len(r.neighborhood) == 10 and {p.answer for p in r.neighborhood} == {"French"}


@pytest.mark.dev_data
def test_counterfact_mend_fields(data_dir):
    r = load_requests(data_dir / "counterfact/counterfact_dev_mend.json", limit=1)[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    assert r.paraphrase_prompts == ["Where Danielle Darrieux is from, people speak the language of"]
    assert r.neighborhood == [Probe("Michel Rocard is a native speaker of", "French")]


@pytest.mark.dev_data
def test_zsre_mend_fields(data_dir):
    requests = load_requests(data_dir / "zsre/zsre_dev_mend.json", limit=13, on_error="skip")
    r = requests[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true, r.case_id) == (
        "What company made Volvo B12M?", "Volvo B12M", "Volkswagen Group", "Volvo Buses", 0)
    assert r.paraphrase_prompts == ["Volvo B12M's manufacturer was who?"]
    # "nq question: who sang ..." -> a question
    assert r.neighborhood == [Probe("Who sang it must have been love but its over now?", "Roxette")]
    assert r.portability == [Probe("In which city is the headquarters of the company that made the Volvo B12M?",
                                   "Wolfsburg, Germany")]
    assert requests[12].target_new == "species"  # stored " species": targets are stripped
    assert all(not p.prompt.startswith("nq question") for r in requests for p in r.neighborhood)


@pytest.mark.dev_data
def test_knowedit_fields(data_dir):
    r = load_requests(data_dir / "zsre/zsre_dev_knowedit.json", limit=1)[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "What species is ZIC3 specific to?", "ZIC3", "male", "human")
    assert r.neighborhood == [Probe("The strand orientation of ZIC3 is", "forward strand"),
                              Probe("ZIC3 strand orientation", "forward strand")]
    assert r.portability == [Probe("What is the function of Zic family member 3?", "male")]
    wiki = load_requests(data_dir / "knowedit/wiki_counterfact_train_cf.json", limit=1)[0]
    assert wiki.target_true == "France" and wiki.paraphrase_prompts == []
    assert len(wiki.portability) == 2 and len(wiki.neighborhood) == 1


@pytest.mark.dev_data
def test_mquake_flattening_and_cases(data_dir):
    path = data_dir / "mquake/MQuAKE-hard.json"
    requests = load_requests(path, limit=4)
    assert [r.case_id for r in requests] == ["7417/0", "7417/1", "7417/2", "7417/3"]
    assert requests[0].prompt == "Hey Jude was performed by" and requests[0].target_new == "Madonna"
    assert requests[0].paraphrase_prompts == ["Who performed Hey Jude?"]
    assert [len(r.portability) for r in requests] == [0, 0, 0, 3]  # multi-hop: after the whole case
    assert {p.answer for p in requests[3].portability} == {"Arabic"}
    cases = load_mquake_cases(path)
    assert len(cases) == 429 and cases[0].case_id == 7417
    assert cases[0].requests == requests and cases[0].new_answer == "Arabic" and cases[0].answer == "English"
    assert len(cases[0].questions) == 3 and "Arabic language" in cases[0].new_answer_alias
    assert len(load_mquake_cases(path, limit=5)) == 5
    assert len(load_requests(path, limit=6)) == 6


@pytest.mark.dev_data
def test_corpus_files_are_not_requests(data_dir):
    path = data_dir / "corpus/wikipedia_en_sample_00.jsonl"
    docs = read_records(path)
    assert len(docs) == 302 and set(docs[0]) == {"title", "text", "source_path"}
    assert len(read_records(data_dir / "corpus/wikipedia_en_sample_01.jsonl")) == 287
    with pytest.raises(RequestError, match="unknown record format with keys"):
        load_requests(path)


# --------------------------------------------------------------------------- sources


CF_ROME = {"case_id": 7, "requested_rewrite": {
    "prompt": "The capital of {} is", "subject": "France",
    "target_new": {"str": "Rome"}, "target_true": {"str": "Paris", "id": "Q90"}},
    "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["The capital of Germany is"],
    "attribute_prompts": [], "generation_prompts": ["France is"]}
NATIVE = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "unmanned aircraft",
        "answers": ["uniform"], "rephrase": "What will be the product of UniFirst?",
        "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers"}


def test_lists_and_dicts():
    (a,) = load_requests([CF_ROME])
    assert (a.prompt, a.target_true, a.case_id) == ("The capital of France is", "Paris", 7)
    assert a.neighborhood == [Probe("The capital of Germany is", "Paris")]
    assert load_requests(CF_ROME) == [a]  # a single dict
    (b,) = load_requests([NATIVE])
    assert b == EditRequest("The capital of France is", "Rome", "France")
    assert load_requests([b]) == [b]  # EditRequests pass through (checked)
    assert load_requests(r for r in [NATIVE, NATIVE]) == [b, b]  # any iterable
    assert to_requests([NATIVE, b]) == [b, b]
    assert as_requests(NATIVE) == [b] and as_requests([b]) == [b]
    native = dict(NATIVE, paraphrase_prompts=["France's capital city is"],
                  neighborhood=[{"prompt": "The capital of Germany is", "answer": "Berlin"}],
                  portability=[Probe("The country whose capital is Rome is", "France")], case_id="x1")
    (c,) = to_requests([native])
    assert c.neighborhood == [Probe("The capital of Germany is", "Berlin")] and c.case_id == "x1"


@pytest.mark.dev_data
def test_hf_dataset(data_dir):
    datasets = pytest.importorskip("datasets")
    records = json.loads((data_dir / "zsre/zsre_dev_mend.json").read_text())
    records = records[:12] + records[-9:]  # the last 9 have no "portability": Arrow fills None
    ds = datasets.Dataset.from_list(records)
    from_ds = load_requests(ds, on_error="skip")
    assert from_ds == load_requests(records, on_error="skip") and len(from_ds) == 20  # 1 data issue
    assert from_ds[-1].portability == [] and from_ds[0].portability
    cf = datasets.Dataset.from_list(json.loads((data_dir / "counterfact/counterfact_dev_rome.json").read_text())[:5])
    assert [r.case_id for r in load_requests(cf)] == [r["case_id"] for r in cf]
    with pytest.raises(TypeError, match="one split"):
        load_requests(datasets.DatasetDict({"train": ds}))


def test_jsonl_and_any_path(tmp_path):
    path = tmp_path / "my edits.data"  # any name: the content decides
    path.write_text("\n".join(json.dumps(r) for r in [NATIVE, ZSRE, NATIVE]) + "\n\n")
    # the format comes from the first record; a zsRE record is not a kedit one
    with pytest.raises(RequestError, match="record 1, field 'alt': unknown field"):
        load_requests(path)
    path.write_text("\n".join(json.dumps(r) for r in [ZSRE, ZSRE]))
    requests = load_requests(path, format="zsre_mend")
    assert [r.case_id for r in requests] == [0, 1]
    assert requests[0].neighborhood == [Probe("Who plays the cat in the hat movie?", "Mike Myers")]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(CF_ROME, indent=2))  # one pretty-printed record
    assert len(load_requests(single)) == 1


def test_limit_and_options(tmp_path):
    path = paths.SAMPLE_RECORDS
    assert len(load_requests(path, limit=3)) == 3 and load_requests(path, limit=0) == []
    with pytest.raises(ValueError, match="on_error"):
        load_requests(path, on_error="ignore")
    with pytest.raises(ValueError, match="unknown format 'rome'"):
        load_requests(path, format="rome")
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_requests(tmp_path / "nope.json")
    with pytest.raises(TypeError, match="cannot read edit requests"):
        load_requests(42)


def test_detect_format():
    assert detect_format(CF_ROME) == "counterfact"
    assert detect_format(ZSRE) == "zsre_mend"
    assert detect_format(NATIVE) == "kedit"
    assert detect_format({"prompt": "p", "target_new": "t", "ground_truth": "g"}) == "counterfact_mend"
    assert detect_format({"prompt": "p", "target_new": "t", "ground_truth": ["g"], "locality": {}}) == "knowedit"
    assert detect_format({"requested_rewrite": [], "questions": []}) == "mquake"
    assert nq_question("nq question: who wrote hamlet") == "Who wrote hamlet?"


# --------------------------------------------------------------------------- bad input


def bad(**changes) -> dict:
    out = dict(NATIVE, target_true="Paris")
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("record, field, message", [
    (bad(subject="Spain"), "subject", "subject 'Spain' does not occur in prompt"),
    (bad(target_new=""), "target_new", "empty"),
    (bad(target_new="   "), "target_new", "empty"),
    (bad(target_true=""), "target_true", "empty"),
    (bad(target_new="Paris"), "target_new", "target_new equals target_true"),
    (bad(target_new=" Paris "), "target_new", "target_new equals target_true"),
    (bad(prompt=["The capital of France is"]), "prompt", "expected a string, got list"),
    (bad(target_new=3), "target_new", "expected a string, got int"),
    (bad(paraphrase_prompts="France's capital is"), "paraphrase_prompts", "expected a list of strings"),
    (bad(paraphrase_prompts=["ok", 5]), "paraphrase_prompts[1]", "expected a string"),
    (bad(neighborhood=[{"prompt": "a", "target": "b"}]), "neighborhood[0]", "exactly the keys"),
    (bad(neighborhood=["The capital of Germany is"]), "neighborhood[0]", "probe"),
    (bad(portability=[{"prompt": "a", "answer": ""}]), "portability[0].answer", "empty"),
    (bad(case_id=1.5), "case_id", "expected an int or string"),
    (bad(taget_true="Paris"), "taget_true", "unknown field"),
])
def test_bad_native_record(record, field, message):
    records = [NATIVE, record, NATIVE]
    with pytest.raises(RequestError) as err:
        to_requests(records, source="edits.json")
    assert (err.value.source, err.value.index, err.value.field) == ("edits.json", 1, field)
    assert message in str(err.value) and "file edits.json, record 1" in str(err.value)
    good, report = load_requests_with_report(records, on_error="skip")
    assert good == to_requests([NATIVE, NATIVE])  # the others are untouched
    assert report.loaded == 2 and [e.index for e in report.skipped] == [1]


@pytest.mark.parametrize("record, field", [
    ({**ZSRE, "alt": "uniform"}, "alt"),
    ({**ZSRE, "alt": ""}, "alt"),
    ({**ZSRE, "subject": "Unifirst"}, "subject"),
    ({**ZSRE, "answers": [5]}, "answers"),
    ({**ZSRE, "answers": {"a": "uniform"}}, "answers"),
    ({**ZSRE, "answers": []}, "answers"),
    ({k: v for k, v in ZSRE.items() if k != "src"}, "src"),
    ({**ZSRE, "loc": 7}, "loc"),
])
def test_bad_source_fields_are_named(record, field):
    """Errors name the field as the source file spells it."""
    with pytest.raises(RequestError) as err:
        load_requests([ZSRE, record])
    assert err.value.index == 1 and err.value.field == field


def test_bad_nested_fields():
    cf = json.loads(json.dumps(CF_ROME))
    cf["requested_rewrite"]["prompt"] = "The capital of France is"  # no {} slot
    with pytest.raises(RequestError, match="'requested_rewrite.prompt'.*subject slot"):
        load_requests([cf])
    cf = json.loads(json.dumps(CF_ROME))
    cf["requested_rewrite"]["target_new"] = "Rome"  # not {"str": ...}
    with pytest.raises(RequestError, match="'requested_rewrite.target_new.str'"):
        load_requests([cf])
    ke = {"prompt": "Who founded X?", "subject": "X", "target_new": "A", "ground_truth": ["B"],
          "locality": {"Relation_Specificity": [{"prompt": "X is in", "ground_truth": []}]}}
    with pytest.raises(RequestError) as err:
        load_requests([ke])
    assert err.value.field == "locality.Relation_Specificity[0].ground_truth"
    with pytest.raises(RequestError, match="record 1: a record must be an object"):
        load_requests([NATIVE, ["not", "a", "dict"]])


def test_truncated_json_array(tmp_path):
    path = tmp_path / "cut.json"
    text = json.dumps([NATIVE, NATIVE, NATIVE], indent=1)
    path.write_text(text[: text.rindex("target_new")])  # a truncated download
    with pytest.raises(RequestError) as err:
        load_requests(path)
    message = str(err.value)
    assert f"file {path}" in message and "invalid JSON at line" in message and "column" in message
    assert f"(char {path.read_text().rindex(chr(34))})" in message  # at the cut string
    good, report = load_requests_with_report(path, on_error="skip")
    assert good == to_requests([NATIVE, NATIVE])  # the complete records before the cut
    assert len(report.skipped) == 1 and report.skipped[0].index == 2


def _numbered(n: int) -> list[dict]:
    return [dict(NATIVE, target_new=f"City{i}") for i in range(n)]


def test_skip_keeps_the_good_records_after_a_bad_first_record(tmp_path):
    path = tmp_path / "first.json"
    path.write_text(json.dumps([42, {"nonsense": 1}, *_numbered(3)]))
    good, report = load_requests_with_report(path, on_error="skip")
    assert [r.target_new for r in good] == ["City0", "City1", "City2"]
    assert report.format == "kedit" and [e.index for e in report.skipped] == [0, 1]
    assert "record 0: a record must be a JSON object, got int" in str(report.skipped[0])
    with pytest.raises(RequestError, match="record 0: a record must be a JSON object"):
        load_requests(path)


def test_skip_recovers_the_records_after_a_syntax_error(tmp_path):
    records = _numbered(6)
    text = json.dumps(records, indent=1)
    # record 1 loses a comma, record 3 gets a stray character, record 4 a 100k-deep value
    text = text.replace('"City1"', '"City1" "x"', 1).replace('"City3"', '"City3" ?', 1)
    text = text.replace('"City4"', "[" * 100_000 + "]" * 100_000, 1)
    path = tmp_path / "broken.json"
    path.write_text(text)
    good, report = load_requests_with_report(path, on_error="skip")
    assert [r.target_new for r in good] == ["City0", "City2", "City5"]
    assert [e.index for e in report.skipped] == [1, 3, 4]
    assert "3 records skipped" in report.summary()
    for err in report.skipped:
        assert f"file {path}" in str(err) and "invalid JSON at line" in str(err) and "column" in str(err)
    assert "nested too deeply" in str(report.skipped[2])
    path.write_text(json.dumps(_numbered(3)).replace("}, {", "} {", 1))  # a comma missing between records
    good, report = load_requests_with_report(path, on_error="skip")
    assert [r.target_new for r in good] == ["City0", "City1", "City2"] and report.skipped == []
    path.write_text(json.dumps(_numbered(2))[:-1] + ",\n]")  # a trailing comma
    good, report = load_requests_with_report(path, on_error="skip")
    assert len(good) == 2 and report.skipped == []
    with pytest.raises(RequestError, match=r"record 1|invalid JSON at line \d+, column"):
        load_requests(path)


def test_skip_refuses_what_it_cannot_recover(tmp_path):
    """A missing quote hides where the records after it begin: skip says so and keeps nothing."""
    text = json.dumps(_numbered(4), indent=1).replace('"City1"', 'City1"', 1)
    path = tmp_path / "quote.json"
    path.write_text(text)
    with pytest.raises(RequestError) as err:
        load_requests(path, on_error="skip")
    message = str(err.value)
    assert f"file {path}, record 1: invalid JSON at line" in message and "column" in message
    assert "cannot skip only this record" in message and "1 records before it are intact" in message


def test_skipped_records_keep_their_numbers(tmp_path):
    lines = [json.dumps(NATIVE), "{broken", json.dumps(dict(NATIVE, target_new=""))]
    (tmp_path / "e.jsonl").write_text("\n".join(lines))
    _, report = load_requests_with_report(tmp_path / "e.jsonl", on_error="skip")
    assert [e.index for e in report.skipped] == [1, 2]


def test_deep_json_and_huge_numbers_are_request_errors(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" + json.dumps(NATIVE) + ", " + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(RequestError, match=r"record 1: invalid JSON at line 1, column \d+ .*nested too deeply"):
        load_requests(deep)
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RequestError, match=f"file {deep}, record 0: .*nested too deeply"):
        load_requests(deep)
    good, report = load_requests_with_report(deep, on_error="skip")
    assert good == [] and [e.index for e in report.skipped] == [0]
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps(NATIVE) + "\n" + json.dumps(NATIVE)[:-1] + ', "case_id": ' + "7" * 5000 + "}")
    with pytest.raises(RequestError, match=rf"file {big}, record 1: invalid JSON at line 2.*digits"):
        load_requests(big)
    long_id = tmp_path / "id.json"
    long_id.write_text(json.dumps([dict(NATIVE, case_id=int("9" * 4000))]))
    with pytest.raises(RequestError, match=rf"file {long_id}, record 0, field 'case_id': an integer of more than 18 digits"):
        load_requests(long_id)


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new", "case_id"])
def test_lone_surrogates_are_request_errors(tmp_path, field):
    record = dict(NATIVE, case_id="c1")
    record[field] = record[field][:1] + "\ud800" + record[field][1:]
    path = tmp_path / "s.json"
    path.write_text(json.dumps([NATIVE, record]))  # json.dumps writes "\\ud800"
    with pytest.raises(RequestError, match=rf"record 1, field '{field}': not valid Unicode text.*lone surrogate"):
        load_requests(path)
    neighbor = dict(NATIVE, neighborhood=[{"prompt": "X\udfff is in", "answer": "Y"}])
    with pytest.raises(RequestError, match=r"field 'neighborhood\[0\]\.prompt': not valid Unicode"):
        load_requests([neighbor])


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    lines = [json.dumps(NATIVE), json.dumps(NATIVE)[:-5], json.dumps(dict(NATIVE, target_new="Lyon"))]
    path.write_text("\n".join(lines))
    with pytest.raises(RequestError, match=r"invalid JSON at line 2 \(char \d+\)"):
        load_requests(path)
    good, report = load_requests_with_report(path, on_error="skip")
    assert [r.target_new for r in good] == ["Rome", "Lyon"]
    assert isinstance(report, LoadReport) and report.loaded == 2 and len(report.skipped) == 1
    assert "1 records skipped" in report.summary()


def test_not_json(tmp_path):
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(RequestError, match="empty"):
        load_requests(tmp_path / "empty.json")
    (tmp_path / "x.csv").write_text("prompt,target_new\nA,B\n")
    with pytest.raises(RequestError, match="expected a JSON array or JSON lines"):
        load_requests(tmp_path / "x.csv")
    (tmp_path / "obj.json").write_text('"just a string"')
    with pytest.raises(RequestError):
        load_requests(tmp_path / "obj.json")
    (tmp_path / "latin1.json").write_bytes('[{"prompt": "Z\xfcrich"}]'.encode("latin-1"))
    with pytest.raises(RequestError, match="not UTF-8"):
        load_requests(tmp_path / "latin1.json")

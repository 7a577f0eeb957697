"""SERAC: memory edit contract, routing of forward and generate, sequential memories,
1,000 stored edits, the Lightning module, artifacts, and the shipped SmolLM2 editor."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from kedit.data.encode import encode, target_logprobs
from kedit.editors.base import Edit, EditStack, EditStateError
from kedit.editors.serac import ROUTER_ATTR, SERAC, HashedNgrams, SERACHparams

from conftest import assert_state_equal
from contract_settings import InductionCopyLM, paper_editor

REQS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France"},
    {"prompt": "Michael Jordan plays", "target_new": "soccer", "subject": "Michael Jordan"},
]
UNRELATED = ["Lionel Messi plays", "The Eiffel Tower is located in"]
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "serac-smollm2-135m-counterfact.safetensors"


def _forward(model, tok, prompts, targets):
    b = encode(tok, prompts, targets)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    return out, b


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_edit_contract_and_routing(tiny, family):
    model, tok = tiny(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keys = set(model.__dict__)
    prompts = [r["prompt"] for r in REQS] + UNRELATED[:1]
    targets = [r["target_new"] for r in REQS] + ["guitar"]
    before, b = _forward(model, tok, prompts, targets)
    editor = paper_editor("serac", model, tok)
    edit = editor.edit(model, tok, REQS)
    assert_state_equal(model, state)  # edit() is pure
    assert set(model.__dict__) == keys
    with edit.applied(model):
        assert ROUTER_ATTR in model.__dict__
        after, _ = _forward(model, tok, prompts, targets)
    lp0 = target_logprobs(before.logits, b["labels"])[0]
    lp1 = target_logprobs(after.logits, b["labels"])[0]
    assert (lp1[:2] > lp0[:2] + 1.0).all(), (lp0, lp1)  # in scope: the counterfactual answer
    assert torch.equal(after.logits[2], before.logits[2])  # out of scope: bit-identical base logits
    assert after.loss < before.loss
    # restore leaves the instance exactly as it was
    assert_state_equal(model, state)
    assert set(model.__dict__) == keys and "forward" not in model.__dict__
    again, _ = _forward(model, tok, prompts, targets)
    assert torch.equal(again.logits, before.logits)


def test_generate_routes_in_scope_rows_only(tiny):
    model, tok = tiny("llama")
    tok.padding_side = "left"
    batch = tok([REQS[0]["prompt"], UNRELATED[0]], return_tensors="pt", padding=True)
    base = model.generate(**batch, max_new_tokens=4, do_sample=False)
    edit = paper_editor("serac", model, tok).edit(model, tok, REQS[:1])
    with edit.applied(model):
        routed = model.generate(**batch, max_new_tokens=4, do_sample=False)
    tok.padding_side = "right"
    width = batch["input_ids"].shape[1]
    assert tok.decode(routed[0, width:]).startswith(" Rome")
    assert torch.equal(routed[1, : base.shape[1]], base[1])  # out of scope: the base model's tokens
    assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), base)


def test_sequential_memories_extend_and_restore_in_reverse(tiny):
    model, tok = tiny("llama")
    editor = paper_editor("serac", model, tok)
    first, second = editor.edit(model, tok, REQS[:1]), editor.edit(model, tok, REQS[1:])
    stack = EditStack([first])
    prompts, targets = [r["prompt"] for r in REQS], [r["target_new"] for r in REQS]
    before, b = _forward(model, tok, prompts, targets)
    lp0 = target_logprobs(before.logits, b["labels"])[0]
    with stack.applied(model):
        stack.push(second, model)  # pushed onto the applied stack: routing extends
        router = model.__dict__[ROUTER_ATTR]
        assert len(router.memories) == 2
        lp = target_logprobs(_forward(model, tok, prompts, targets)[0].logits, b["labels"])[0]
        assert (lp > lp0 + 1.0).all()
        with pytest.raises(EditStateError):
            first.restore(model)  # not the last one applied
    assert ROUTER_ATTR not in model.__dict__ and "forward" not in model.__dict__
    assert torch.equal(_forward(model, tok, prompts, targets)[0].logits, before.logits)


def test_save_load_roundtrip(tiny, tmp_path):
    model, tok = tiny("llama")
    edit = paper_editor("serac", model, tok).edit(model, tok, REQS)
    with edit.applied(model):
        want, _ = _forward(model, tok, [REQS[0]["prompt"]], [REQS[0]["target_new"]])
    loaded = Edit.load(edit.save(tmp_path / "memory.safetensors"), model)
    assert loaded.descriptors == edit.descriptors and torch.equal(loaded.embeddings, edit.embeddings)
    with loaded.applied(model):
        got, _ = _forward(model, tok, [REQS[0]["prompt"]], [REQS[0]["target_new"]])
    assert torch.equal(got.logits, want.logits)


def test_cached_forward_is_refused_not_misrouted(tiny):
    model, tok = tiny("llama")
    ids = tok([REQS[0]["prompt"]], return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, use_cache=True)
    with paper_editor("serac", model, tok).edit(model, tok, REQS).applied(model):
        with pytest.raises(NotImplementedError, match="cached"):
            model(input_ids=ids[:, -1:], past_key_values=out.past_key_values)


def test_stub_counterfactual_copies_the_descriptor():
    seq = [5, 6, 7, 9, 0, 5, 6, 7]  # descriptor [5 6 7 9], separator 0, input [5 6 7]
    assert InductionCopyLM.copies(seq)[7] == 9


def test_loaded_memories_share_one_editor_per_model_and_rebuild_it_from_the_reference(tiny, tmp_path):
    """A loaded memory has no editor object; applying it on a model where a memory of the same
    editor is routed reuses that editor, and on a fresh model rebuilds it from its hparams."""
    model, tok = tiny("llama")
    editor = paper_editor("serac", model, tok)
    first, second = (Edit.load(editor.edit(model, tok, [r]).save(tmp_path / f"m{i}.safetensors"), model)
                     for i, r in enumerate(REQS))
    assert first.editor is None and second.editor is None
    with EditStack([first, second]).applied(model):
        assert first.editor is second.editor and first.editor is not editor
        assert first.editor.hparams == editor.hparams


def test_different_tokenizer_scores_text_spans(tiny):
    """Counterfactual LM with another tokenizer: the routed log-prob of a target equals the
    counterfactual model's own log-prob of the target text after the same prefix."""
    import transformers as tf

    from kedit.editors.serac import cf_prefix
    from kedit.testing import tiny_tokenizer

    model, tok = tiny("llama")
    cft = tiny_tokenizer(300)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(cft), max_position_embeddings=128)
    torch.manual_seed(1)
    cf = tf.LlamaForCausalLM(cfg).eval()
    editor = SERAC(classifier="ngram", counterfactual="tiny-llama")
    editor.cf_model, editor.cf_tokenizer = cf, cft
    edit = editor.edit(model, tok, REQS[:1])
    with edit.applied(model):
        out, b = _forward(model, tok, [REQS[0]["prompt"]], [REQS[0]["target_new"]])
    routed = target_logprobs(out.logits, b["labels"])[0][0]
    prefix = cft(cf_prefix(editor.hparams, edit.descriptors[0]))["input_ids"]
    prompt_ids = cft(REQS[0]["prompt"], add_special_tokens=False)["input_ids"]
    full = cft(REQS[0]["prompt"] + " Rome", add_special_tokens=False)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logp = torch.log_softmax(cf(torch.tensor([prefix + full])).logits[0].float(), -1)
    n = len(prefix)
    direct = sum(float(logp[n + j - 1, full[j]]) for j in range(len(prompt_ids), len(full)))
    assert routed.item() == pytest.approx(direct, abs=1e-4)


@pytest.mark.dev_data
def test_1000_stored_edits_route_correctly(tiny, data_dir):
    """1,000 CounterFact edits in memory (n-gram classifier: cheap, untrained): each exact
    prompt routes to its own edit, unrelated text to none."""
    from kedit.data.loaders import load_requests

    requests = load_requests(data_dir / "counterfact" / "counterfact_train_mend.json", limit=1000)
    model, tok = tiny("llama")
    editor = SERAC(SERACHparams(classifier="ngram", counterfactual="base"))
    edit = editor.edit(model, tok, requests)
    assert edit.embeddings.shape == (1000, HashedNgrams().dim)
    with edit.applied(model):
        router = model.__dict__[ROUTER_ATTR]
        sample = requests[::20]
        picks = router.route([f"{r.prompt} {r.target_new}" for r in sample])
        assert all(p is not None and p[1] == 20 * i for i, p in enumerate(picks))
        assert router.route(["What is two plus two? Four.", "Bonjour, comment allez-vous ?"]) == [None, None]
        # the routed forward also works at this memory size
        out, b = _forward(model, tok, [sample[1].prompt], [sample[1].target_new])
        assert out.logits.shape[0] == 1


def test_lightning_fast_dev_run_export_and_load(tmp_path, monkeypatch):
    """SERACModule through `python -m kedit.train fit` (tiny LLaMA, MiniLM classifier), exported
    artifact loaded with kedit.load_editor and used to edit."""
    import kedit
    from kedit.testing import tiny_model
    from kedit.train import main

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    art = tmp_path / "serac-tiny.safetensors"
    main(["fit", "--config", str(root / "configs/serac/tiny-llama.yaml"), "--trainer.fast_dev_run=true",
          "--trainer.logger=false", "--trainer.accelerator=cpu",
          "--export", str(art)])
    assert art.is_file()
    model, tok = tiny_model("llama")
    editor = kedit.load_editor(art, model)
    assert isinstance(editor, SERAC) and editor.hparams.trained and editor.cf_delta
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit = editor.edit(model, tok, REQS)
    with edit.applied(model):
        out, _ = _forward(model, tok, [REQS[0]["prompt"]], [REQS[0]["target_new"]])
        assert torch.isfinite(out.logits).all()
    assert_state_equal(model, state)


def test_cross_encoder_classifier_trains():
    """The cross-encoder variant: a few optimizer steps on one batch change the trained layers
    and lower the classifier loss; the classifier scores pairs."""
    from kedit.lightning.serac import SERACModule, SERACTraining

    module = SERACModule(SERACHparams(classifier="all-minilm-l6-v2", classifier_kind="cross",
                                      classifier_max_length=32, counterfactual="tiny-llama"),
                         SERACTraining(classifier_train_layers=1, lora_rank=2, lr=1e-3, answer_augment=0.0))
    batch = {"prompt": [r["prompt"] for r in REQS], "target": [r["target_new"] for r in REQS],
             "equiv": ["France's capital city is", "Michael Jordan is a player of"],
             "loc_prompt": UNRELATED, "loc_answer": ["soccer", "Paris"]}
    clf = module.editor.classifier
    trained = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    assert trained and any(n.startswith("head.") for n in trained)
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, _stats = module.classifier_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    params = dict(clf.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in trained.items() if n.startswith("head."))
    assert any(not torch.equal(params[n], before) for n, before in trained.items() if n.startswith("encoder."))
    logits = clf.scope_logits(["The capital of France is"], ["a", "b", "c"])
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


@pytest.mark.real_model
@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped SERAC artifact")
def test_shipped_serac_on_smollm2(smollm2):
    """The trained SERAC (first edit-split CounterFact dev record): the edit prompt and its
    dataset rephrasing get the new answer, teacher-forced and generated; an unrelated
    prompt keeps bit-identical logits; the model is untouched afterwards."""
    import kedit

    model, tok = smollm2
    state_keys = set(model.__dict__)
    editor = kedit.load_editor(SHIPPED, model)
    req = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
           "target_new": "English", "target_true": "French"}
    para = "Where Danielle Darrieux is from, people speak the language of"
    prompts, targets = [req["prompt"], para, "The capital of Japan is"], ["English", "English", "Tokyo"]
    before, b = _forward(model, tok, prompts, targets)
    edit = editor.edit(model, tok, req)
    with edit.applied(model):
        after, _ = _forward(model, tok, prompts, targets)
        tok.padding_side = "left"
        try:
            ids = tok(prompts[:2], return_tensors="pt", padding=True)
            gen = model.generate(**ids, max_new_tokens=2, do_sample=False)
        finally:
            tok.padding_side = "right"
    _, correct, length = target_logprobs(after.logits, b["labels"])
    assert (correct[:2] == length[:2]).all()  # every target token is the argmax, prompt and rephrase
    assert torch.equal(after.logits[2], before.logits[2])
    width = ids["input_ids"].shape[1]
    assert all(tok.decode(g[width:]).strip().startswith("English") for g in gen)
    assert set(model.__dict__) == state_keys
    assert torch.equal(_forward(model, tok, prompts, targets)[0].logits, before.logits)


def test_batched_counterfactual_matches_row_by_row(tiny):
    """Several in-scope rows go through the counterfactual model in one padded batch; the
    result matches scoring / generating each row alone."""
    model, tok = tiny("llama")
    editor = SERAC(SERACHparams(classifier="ngram", counterfactual="base"))
    edit = editor.edit(model, tok, REQS)
    rows = [tok(f"{r['prompt']} {r['target_new']}")["input_ids"] for r in REQS]
    with edit.applied(model):
        router = model.__dict__[ROUTER_ATTR]
        batched = editor.counterfactual_logits_batch(router, edit.descriptors, rows, tok)
        single = [editor.counterfactual_logits(router, d, r, tok) for d, r in zip(edit.descriptors, rows)]
        for a, b in zip(batched, single):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        kwargs = {"max_new_tokens": 3, "do_sample": False}
        gen_b = editor.counterfactual_generate_batch(router, edit.descriptors, rows, tok, 0, kwargs)
        gen_s = [editor.counterfactual_generate(router, d, r, tok, 0, kwargs) for d, r in zip(edit.descriptors, rows)]
        assert gen_b == gen_s


def test_an_artifact_with_a_retired_hyperparameter_loads_at_its_no_op_value_only(tmp_path):
    """Artifacts written before `copy_bias` was removed (the shipped one among them) still load
    when it is 0.0; any other value is refused, naming the file and the field."""
    from kedit.checkpoint import save_artifact
    from kedit.editors import EditFileError
    from kedit.editors.serac import SERAC, SERACHparams

    hp = dataclasses.asdict(SERACHparams(classifier="ngram", counterfactual="base", trained=False))
    ok = save_artifact(tmp_path / "ok.safetensors", "serac", {}, {**hp, "copy_bias": 0.0})
    assert SERAC.from_artifact(ok).hparams == SERACHparams(**hp)
    bad = save_artifact(tmp_path / "bad.safetensors", "serac", {}, {**hp, "copy_bias": 8.0})
    with pytest.raises(EditFileError, match=r"bad.safetensors: field 'kedit_editor\.hparams\.copy_bias'"):
        SERAC.from_artifact(bad)

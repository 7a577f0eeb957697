"""kedit.eval: metric functions against hand computations, the scoring passes, every
evaluation mode on a tiny model (pure, bit-exact restore, curves), outputs and the CLI."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_state_equal

from kedit.data import EditRequest, Probe
from kedit.data.encode import IGNORE, target_ids, target_logprobs
from kedit.editors.base import Edit, Editor, WeightDelta, base_identity
from kedit.eval import (EvalConfig, Perplexity, Rate, RestoreError, Results, evaluate, generation_match,
                        kl_divergence, mean_ngram_entropy, ngram_entropy, normalize_answer, prob_greater,
                        token_accuracy, top1_agreement)
from kedit.eval import runner as runner_module
from kedit.eval.runner import _curve_checkpoints, fingerprint
from kedit.eval.scorer import Scorer, queries
from kedit.eval.scoring import generate, load_texts, next_token_logprobs, score_targets
from kedit.models import arch_of

# --------------------------------------------------------------------------- functional core


def test_prob_greater_compares_mean_per_token_nll():
    # new: 2 tokens, log-probs sum -2 (mean NLL 1.0); true: 1 token, log-prob -1.5 (NLL 1.5)
    assert prob_greater(torch.tensor([-2.0]), torch.tensor([2]), torch.tensor([-1.5]), torch.tensor([1])).item()
    # summed log-prob would say the opposite (-2 < -1.5): ROME compares means
    assert not prob_greater(torch.tensor([-1.5]), torch.tensor([1]), torch.tensor([-2.0]), torch.tensor([2])).item()


def test_teacher_forced_scores_from_hand_made_logits():
    # vocab of 4; sequence: prompt token 0, target tokens 2, 3
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = 0.0      # predicts token 2 (correct), p ~ 1
    logits[0, 1, 1] = 0.0      # predicts token 1 (wrong: gold is 3)
    logits[0, 1, 3] = math.log(0.5)
    labels = torch.tensor([[IGNORE, 2, 3]])
    logp, correct, length = target_logprobs(logits, labels)
    assert correct.item() == 1 and length.item() == 2
    acc, exact = token_accuracy(correct, length)
    assert acc.item() == pytest.approx(0.5) and exact.item() == 0.0
    # hand: p(2 | pos 0) = 1/(1 + 3e^-10), p(3 | pos 1) = 0.5/(1 + 0.5 + 2e^-10)
    e = math.exp(-10)
    expected = math.log(1 / (1 + 3 * e)) + math.log(0.5 / (1.5 + 2 * e))
    assert logp.item() == pytest.approx(expected, abs=1e-5)


def test_kl_and_agreement_by_hand():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(p.log(), p.log()).item() == 0.0
    pre, post = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 5, 3, 9]])
    mask = torch.tensor([[True, True, True, False]])
    assert top1_agreement(pre, post, mask).item() == pytest.approx(2 / 3)


def test_ngram_entropy_matches_hand_computation():
    # bigrams of "a b a b": (a,b) x2, (b,a) x1 -> H2 = H(2/3, 1/3); trigrams (a,b,a), (b,a,b) -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert ngram_entropy("word") == 0.0  # no bigrams
    # repetition lowers it; punctuation is a token
    assert ngram_entropy("the cat sat on the mat, then left.") > ngram_entropy("the the the the the the the the")
    assert mean_ngram_entropy(["a b a b", "word"]) == pytest.approx(expected / 2)


@pytest.mark.parametrize("continuation,target,ok", [
    ("Paris", "Paris", True),
    ("  paris, the capital", "Paris", True),
    ("PARIS.", "Paris", True),
    ('"Rome" is', "Rome", True),
    ("New   York City", "New York", True),
    ("Parisian food", "Paris", False),
    ("the city of Paris", "Paris", False),
    ("", "Paris", False),
    ("U.S. Army", "U.S.", True),
    ("Englishman", "English", False),
])
def test_generation_match_normalization(continuation, target, ok):
    assert generation_match(continuation, target) is ok


def test_normalize_answer():
    assert normalize_answer("  The\n Beatles! ") == "the beatles"
    assert normalize_answer("«Roma»") == "roma"


def test_rate_and_perplexity_metrics_reduce_like_ddp():
    # two "ranks" with different numbers of examples: the merged mean is over all examples
    a, b = Rate(), Rate()
    a.update([1.0, 0.0, float("nan")])
    b.update([1.0])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(2 / 3)
    assert math.isnan(Rate().compute().item())
    p, q = Perplexity(), Perplexity()
    p.update(10.0, 5)
    q.update(2.0, 3)
    p.merge_state(q)
    assert p.compute().item() == pytest.approx(math.exp(12 / 8))


def test_curve_checkpoints():
    assert _curve_checkpoints(10, 1, 3) == {3, 6, 9, 10}
    assert _curve_checkpoints(500, 50, 0) == set(range(50, 501, 50))
    assert _curve_checkpoints(7, 2, 4) == {4, 7}


def test_curve_checkpoints_at_given_counts():
    """``curve_at``: the curve at those counts (the next step boundary when one falls inside a
    step), always at the end, counts past the end dropped; ``every`` is ignored."""
    assert _curve_checkpoints(1000, 1, 3, [10, 100, 500, 1000]) == {10, 100, 500, 1000}
    assert _curve_checkpoints(300, 1, 0, [10, 100, 500, 1000]) == {10, 100, 300}
    assert _curve_checkpoints(10, 4, 0, [5]) == {8, 10}


# --------------------------------------------------------------------------- scoring passes


def test_batched_scoring_and_generation_match_unbatched(tiny):
    model, tok = tiny("llama")
    prompts = ["The capital of France is", "Toko Yasuda plays", "The Eiffel Tower is located in the city of"]
    targets = ["Rome", "the guitar", "Paris"]
    batched = score_targets(model, tok, prompts, targets, batch_size=3)
    assert not batched.logp.requires_grad  # scoring builds no autograd graph
    for i in range(3):
        one = score_targets(model, tok, prompts[i:i + 1], targets[i:i + 1], batch_size=1)
        assert one.logp.item() == pytest.approx(batched.logp[i].item(), abs=1e-4)
        assert one.length.item() == len(target_ids(tok, targets[i]))
        assert torch.equal(one.top1[0], batched.top1[i])
    logp = next_token_logprobs(model, tok, prompts, batch_size=3)
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        ref = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
        assert torch.allclose(logp[i], ref, atol=1e-4)
    # the same distributions read off the scoring pass, for a subset of pairs in any order,
    # across batches of pairs sorted by length
    both = score_targets(model, tok, prompts, targets, batch_size=2, next_of=[2, 0])
    assert both.next_logp.shape == (2, logp.shape[-1])
    assert torch.allclose(both.next_logp[0], logp[2], atol=1e-4)
    assert torch.allclose(both.next_logp[1], logp[0], atol=1e-4)
    assert torch.allclose(both.logp, batched.logp, atol=1e-4)
    for bad in ([0, 0], [3]):  # a repeated or missing pair would leave rows unfilled
        with pytest.raises(ValueError, match="next_of"):
            score_targets(model, tok, prompts, targets, next_of=bad)
    # left-padded batched greedy decoding equals one prompt at a time
    together = generate(model, tok, prompts, [3, 5, 4], batch_size=3)
    alone = [generate(model, tok, [p], n, batch_size=1)[0] for p, n in zip(prompts, [3, 5, 4])]
    assert together == alone


def test_load_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    assert load_texts(tmp_path / "a.jsonl", 2) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"title": "x"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_texts(tmp_path / "b.jsonl", 5)
    (tmp_path / "c.txt").write_text("para one\n\npara two\n")
    assert load_texts(tmp_path / "c.txt", 5) == ["para one", "para two"]


# --------------------------------------------------------------------------- a toy editor


@dataclass
class BoostHparams:
    alpha: float = 12.0
    """Logit added to each target token where it is predicted after the edit prompt."""


class Boost(Editor):
    """Adds ``alpha * h / |h|^2`` to the LM-head row of each target token, where ``h`` is the
    final hidden state at the position predicting it: the token's logit there rises by
    ``alpha``. A real weight edit (a dense WeightDelta), method-agnostic for the runner."""

    Hparams = BoostHparams

    @torch.no_grad()
    def edit(self, model, tokenizer, requests):
        from kedit.editors.base import as_requests

        requests = as_requests(requests)
        arch = arch_of(model)
        name = f"{arch.lm_head}.weight"
        weight = dict(model.named_parameters())[name]
        delta = torch.zeros_like(weight)
        for r in requests:
            ids = tokenizer(r.prompt, return_tensors="pt")["input_ids"]
            targets = target_ids(tokenizer, r.target_new)
            full = torch.cat([ids, torch.tensor([targets])], 1)
            hidden = model(input_ids=full, output_hidden_states=True).hidden_states[-1][0]
            for j, t in enumerate(targets):  # the position predicting target token j
                h = hidden[ids.shape[1] - 1 + j]
                delta[t] += self.hparams.alpha * h / h.dot(h)
        return WeightDelta(dense={name: delta}, base=base_identity(model, [name]))


class LeakyEdit(Edit):
    """restore() forgets to put the weights back."""

    def apply(self, model):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)

    def restore(self, model):
        pass


class Leaky(Editor):
    Hparams = BoostHparams

    def edit(self, model, tokenizer, requests):
        return LeakyEdit()


class Impure(Editor):
    Hparams = BoostHparams

    def edit(self, model, tokenizer, requests):
        with torch.no_grad():
            next(model.parameters()).mul_(1.5)
        return LeakyEdit()


REQUESTS = [
    EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
                paraphrase_prompts=["France's capital city is"],
                neighborhood=[Probe("The capital of Germany is", "Berlin"), Probe("The capital of Italy is", "Rome")],
                portability=[Probe("The Eiffel Tower is located in the capital of", "Rome")],
                generation_prompts=["France is", "France is", "The French capital"]),
    EditRequest(prompt="Toko Yasuda plays", subject="Toko Yasuda", target_new="soccer", target_true="guitar",
                paraphrase_prompts=["Toko Yasuda is a player of", "Toko Yasuda performs on the"],
                neighborhood=[Probe("Lionel Messi plays", "soccer")]),
    EditRequest(prompt="The mother tongue of Danielle Darrieux is", subject="Danielle Darrieux",
                target_new="English", target_true="French"),
    EditRequest(prompt="Michael Jordan plays", subject="Michael Jordan", target_new="guitar"),
]
CFG = dict(fluency_new_tokens=8, ppl_docs=2, ppl_tokens=32, eval_group=2, progress=False)


@pytest.fixture
def ppl_text(tmp_path):
    path = tmp_path / "held.txt"
    path.write_text("The capital of Italy is Rome.\n\nLionel Messi plays soccer and Toko Yasuda plays guitar.\n")
    return str(path)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode,batch_size", [("single", None), ("batch", None), ("batch", 3),
                                             ("sequential", None), ("sequential", 3)])
def test_modes_pure_restore_and_improve(tiny, ppl_text, mode, batch_size):
    model, tok = tiny("llama")
    state = _state(model)
    res = evaluate(model, tok, Boost(), REQUESTS, mode=mode, batch_size=batch_size, ppl_path=ppl_text, **CFG)
    assert_state_equal(model, state)  # restored bit-exactly, also after sequential stacking
    pre, post = res.summary["pre"], res.summary["post"]
    assert pre["rewrite/acc"] < post["rewrite/acc"]
    assert post["rewrite/es"] == 1.0 and pre["rewrite/es"] < 1.0
    assert res.summary["n"]["rewrite/es"] == 3  # the request without target_true has no ES
    assert res.summary["n"]["portability/acc"] == 1
    # the pre-edit pass is the reference: agreement 1, KL 0
    assert pre["neighborhood/agree"] == 1.0 and pre["neighborhood/kl"] == 0.0
    assert post["neighborhood/kl"] >= 0.0
    assert all(math.isfinite(v) for v in (pre["general/ppl"], post["general/ppl"], post["fluency/ngram_entropy"]))
    assert len(res.per_request) == 4 and all("pre" in r and "post" in r for r in res.per_request)
    n_edits = {"single": 4, "batch": 1 if batch_size is None else 2, "sequential": 4 if batch_size is None else 2}
    assert res.meta["n_edits"] == n_edits[mode] == len(res.meta["edit_seconds"])
    assert res.meta["peak_rss_mb"] > 0
    if mode == "sequential":
        step = batch_size or 1
        assert [c["n_edits"] for c in res.curves] == [0] + sorted(_curve_checkpoints(4, step, 0))
        assert res.curves[0]["first1:rewrite/es" if step == 1 else "first3:rewrite/es"] < 1.0
        assert res.curves[-1]["seen:rewrite/es"] == 1.0
        assert all(math.isfinite(c["general/ppl"]) for c in res.curves)
    else:
        assert res.curves == []


def test_ppl_every_measures_perplexity_after_some_edits_only(tiny, ppl_text):
    model, tok = tiny("llama")
    every = evaluate(model, tok, Boost(), REQUESTS, mode="single", ppl_path=ppl_text, generation=False, **CFG)
    sparse = evaluate(model, tok, Boost(), REQUESTS, mode="single", ppl_path=ppl_text, generation=False,
                      ppl_every=3, **CFG)
    ppl = [r["post"]["general/ppl"] for r in sparse.per_request]
    assert math.isfinite(ppl[0]) and math.isfinite(ppl[3]) and math.isnan(ppl[1]) and math.isnan(ppl[2])
    # the measured ones are the same numbers, and the pooled perplexity is over them only
    full = [r["post"]["general/ppl"] for r in every.per_request]
    assert (ppl[0], ppl[3]) == (full[0], full[3])
    assert min(ppl[0], ppl[3]) <= sparse.summary["post"]["general/ppl"] <= max(ppl[0], ppl[3])
    batched = evaluate(model, tok, Boost(), REQUESTS, mode="batch", batch_size=1, ppl_path=ppl_text,
                       generation=False, ppl_every=2, **CFG)
    assert [math.isfinite(r["post"]["general/ppl"]) for r in batched.per_request] == [True, False, True, False]
    with pytest.raises(ValueError, match="ppl_every must be >= 1"):
        EvalConfig(ppl_every=0)


def test_sequential_is_stacked_not_independent(tiny, ppl_text):
    # Boost's edits add up on the same LM-head rows: with stacking, request 0's target gets the
    # delta of request 0 and the state after it; post scores come from the whole stack
    model, tok = tiny("llama")
    reqs = [REQUESTS[0], EditRequest(prompt="The capital of Germany is", target_new="Rome", target_true="Berlin")]
    points = []
    seq = evaluate(model, tok, Boost(), reqs, mode="sequential", ppl_path=ppl_text, on_curve=points.append, **CFG)
    assert points == seq.curves and [p["n_edits"] for p in points] == [0, 1, 2]  # streamed as measured
    single = evaluate(model, tok, Boost(), reqs, mode="single", ppl_path=ppl_text, **CFG)
    assert seq.per_request[0]["post"]["rewrite/p_new"] > single.per_request[0]["post"]["rewrite/p_new"]


def test_sequential_releases_free_memory_after_each_step(tiny, ppl_text, monkeypatch):
    # glibc keeps freed heap pages: a 1,000-edit AlphaEdit run grew to 13 GB resident without this
    calls = []
    monkeypatch.setattr(runner_module, "release_free_memory", lambda: calls.append(1) or True)
    model, tok = tiny("llama")
    reqs = [REQUESTS[0], EditRequest(prompt="The capital of Germany is", target_new="Rome", target_true="Berlin")]
    evaluate(model, tok, Boost(), reqs, mode="sequential", ppl_path=ppl_text, **CFG)
    assert len(calls) == 2


class Stop(Exception):
    """Raised by an editor to stop a run, as a deadline or a kill would."""


def _stopping(editor, after: int):
    """``editor`` whose ``edit`` raises :class:`Stop` on call ``after + 1``."""
    calls, edit = [], editor.edit

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise Stop
        return edit(*args, **kwargs)

    editor.edit = flaky
    return editor


def _without_times(res):
    curves = [{k: v for k, v in c.items() if k != "edit_seconds_mean"} for c in res.curves]
    records = [{k: v for k, v in r.items() if k not in ("edit_seconds", "edit_cpu_seconds")} for r in res.per_request]
    return curves, records


def test_sequential_checkpoint_resumes_as_one_run(tiny, ppl_text, tmp_path):
    """A sequential run stopped after 3 edits and run again with the same ``checkpoint`` folder
    goes on from its last checkpoint (every 2 requests, and the curve point at 1): its curve and
    scores are those of a run never stopped. The stopped run leaves the model bit-exact, the
    finished one removes the checkpoint."""
    model, tok = tiny("llama")
    state = _state(model)
    kw = dict(mode="sequential", ppl_path=ppl_text, curve_full=True, curve_at=[1, 3], **CFG)
    whole = evaluate(model, tok, Boost(), REQUESTS, **kw)
    folder = tmp_path / "ckpt"
    with pytest.raises(Stop):
        evaluate(model, tok, _stopping(Boost(), after=3), REQUESTS, checkpoint=folder, checkpoint_every=2, **kw)
    assert_state_equal(model, state)
    saved = json.loads((folder / "state.json").read_text())
    assert saved["done"] == 3 and [c["n_edits"] for c in saved["curves"]] == [0, 1, 3]  # the curve point at 3
    assert sorted(p.name for p in folder.iterdir()) == ["stack-3.safetensors", "state.json"]  # stack-2 replaced
    assert len(Edit.load(folder / "stack-3.safetensors").edits) == 3
    streamed = []
    resumed = evaluate(model, tok, _stopping(Boost(), after=1), REQUESTS, checkpoint=folder, checkpoint_every=2,
                       on_curve=streamed.append, **kw)  # one edit left: the stopping editor is called once
    assert_state_equal(model, state)
    assert streamed == resumed.curves and [c["n_edits"] for c in streamed] == [0, 1, 3, 4]  # saved points replayed
    assert not folder.exists()
    assert resumed.meta["resumed_at"] == 3 and whole.meta["resumed_at"] == 0
    assert len(resumed.meta["edit_seconds"]) == 4 and [r["edit_step"] for r in resumed.per_request] == [0, 1, 2, 3]
    cpu = resumed.meta["edit_cpu_seconds"]  # saved with the checkpoint, so none is lost by the resume
    assert len(cpu) == 4 and all(s > 0 for s in cpu) and [r["edit_cpu_seconds"] for r in resumed.per_request] == cpu
    (c1, r1), (c2, r2) = _without_times(whole), _without_times(resumed)
    assert c1 == pytest.approx(c2, nan_ok=True) and len(r1) == len(r2)
    for a, b in zip(r1, r2):
        assert a["post"] == pytest.approx(b["post"], nan_ok=True)


def test_sequential_checkpoint_without_cpu_seconds_resumes(tiny, ppl_text, tmp_path):
    """A checkpoint saved before kedit recorded CPU seconds per edit resumes: its edits have
    None, the mean CPU seconds is over the edits that have them, the median wall seconds over all."""
    model, tok = tiny("llama")
    kw = dict(mode="sequential", ppl_path=ppl_text, **CFG)
    folder = tmp_path / "ckpt"
    with pytest.raises(Stop):
        evaluate(model, tok, _stopping(Boost(), after=3), REQUESTS, checkpoint=folder, checkpoint_every=3, **kw)
    state = folder / "state.json"
    saved = json.loads(state.read_text())
    del saved["edit_cpu_seconds"]
    for record in saved["records"]:
        del record["edit_cpu_seconds"]
    state.write_text(json.dumps(saved))
    resumed = evaluate(model, tok, Boost(), REQUESTS, checkpoint=folder, checkpoint_every=3, **kw)
    cpu = resumed.meta["edit_cpu_seconds"]
    assert cpu[:3] == [None] * 3 and cpu[3] > 0 and resumed.meta["edit_cpu_seconds_mean"] == cpu[3]
    assert [r.get("edit_cpu_seconds") for r in resumed.per_request] == cpu
    assert resumed.meta["edit_seconds_median"] == statistics.median(resumed.meta["edit_seconds"])
    assert "edit CPU s (mean)" in resumed.to_markdown()


def test_sequential_checkpoint_of_another_run_is_refused(tiny, ppl_text, tmp_path):
    model, tok = tiny("llama")
    kw = dict(mode="sequential", ppl_path=ppl_text, checkpoint=tmp_path, checkpoint_every=1, **CFG)
    with pytest.raises(Stop):
        evaluate(model, tok, _stopping(Boost(), after=2), REQUESTS, **kw)
    with pytest.raises(ValueError, match=r"state.json: field 'match.requests'"):
        evaluate(model, tok, Boost(), REQUESTS[::-1], **kw)
    with pytest.raises(ValueError, match=r"field 'match.hparams'.*Delete"):
        evaluate(model, tok, Boost(alpha=3.0), REQUESTS, **kw)
    with pytest.raises(ValueError, match="only sequential runs"):
        evaluate(model, tok, Boost(), REQUESTS, mode="batch", checkpoint=tmp_path / "b", ppl_path=ppl_text, **CFG)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json: not a kedit checkpoint"):
        evaluate(model, tok, Boost(), REQUESTS, **kw)


def test_sequential_full_curve(tiny, ppl_text):
    """``curve_full``: curve points at ``curve_at`` also hold the paraphrase and locality scores of
    the requests edited so far (against the pre-edit references, as the final scores) and the mean
    edit time so far; the final scores are those of a run with light curves."""
    model, tok = tiny("llama")
    state = _state(model)
    full = evaluate(model, tok, Boost(), REQUESTS, mode="sequential", ppl_path=ppl_text, curve_full=True,
                    curve_at=[1, 3], **CFG)
    assert_state_equal(model, state)
    assert [c["n_edits"] for c in full.curves] == [0, 1, 3, 4]
    start, end = full.curves[0], full.curves[-1]
    assert "seen:paraphrase/es" not in start and "edit_seconds_mean" not in start
    assert end["seen:paraphrase/acc"] == pytest.approx(full.summary["post"]["paraphrase/acc"])
    assert end["seen:neighborhood/agree"] == pytest.approx(full.summary["post"]["neighborhood/agree"])
    assert end["seen:neighborhood/kl"] == pytest.approx(full.summary["post"]["neighborhood/kl"])
    assert end["edit_seconds_mean"] == pytest.approx(full.meta["edit_seconds_mean"])
    light = evaluate(model, tok, Boost(), REQUESTS, mode="sequential", ppl_path=ppl_text, curve_at=[1, 3], **CFG)
    assert "seen:paraphrase/es" not in light.curves[-1]
    # the final scores come from the last curve point (one scoring of every request, not two)
    assert light.summary.keys() == full.summary.keys()
    for part in light.summary:
        assert light.summary[part] == pytest.approx(full.summary[part], rel=1e-6, nan_ok=True), part


def test_restore_failures_are_caught(tiny, ppl_text):
    model, tok = tiny("gpt2")
    state = _state(model)
    with pytest.raises(RestoreError, match="restoring"):
        evaluate(model, tok, Leaky(), REQUESTS[:1], mode="single", ppl_path=ppl_text, **CFG)
    model.load_state_dict(state)
    with pytest.raises(RestoreError, match="must not change"):
        evaluate(model, tok, Impure(), REQUESTS[:1], mode="single", ppl_path=ppl_text, **CFG)
    model.load_state_dict(state)
    fp = fingerprint(model)
    handle = model.transformer.h[0].register_forward_hook(lambda *a: None)
    assert fingerprint(model) != fp  # a routing hook left behind is caught too
    handle.remove()


def test_results_outputs_and_reuse(tiny, ppl_text, tmp_path):
    model, tok = tiny("gpt2")  # Conv1D orientation goes through the same runner
    res = evaluate(model, tok, Boost(), REQUESTS[:2], mode="single", ppl_path=ppl_text, **CFG)
    text = res.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(text) == data
    assert set(data) == {"summary", "per_request", "curves", "meta"}
    es_pre, es_post = res.summary["pre"]["rewrite/es"], res.summary["post"]["rewrite/es"]
    assert data["summary"]["post"]["rewrite/es"] == es_post > es_pre
    assert "portability/acc" not in data["per_request"][1]["pre"]  # request 1 has no portability probes
    md = res.to_markdown("toy")
    assert "| metric | pre | post | n |" in md and f"| rewrite/es | {es_pre:.3f} | {es_post:.3f} | 2 |" in md
    assert "edit s (mean)" in md
    back = Results.from_json(tmp_path / "r.json")
    assert back.summary["post"]["rewrite/es"] == es_post
    # a second editor reuses the pre-edit scores; the numbers are the same as measuring them
    again = evaluate(model, tok, Boost(alpha=12.0), REQUESTS[:2], mode="single", ppl_path=ppl_text,
                     reuse_pre=back, **CFG)
    assert again.meta["pre_reused"]
    for key, value in res.summary["pre"].items():
        assert again.summary["pre"][key] == pytest.approx(value, nan_ok=True)
    for key, value in res.summary["post"].items():
        assert again.summary["post"][key] == pytest.approx(value, nan_ok=True, rel=1e-5)
    with pytest.raises(ValueError, match="other requests"):
        evaluate(model, tok, Boost(), REQUESTS[1:3], ppl_path=ppl_text, reuse_pre=back, **CFG)
    # a run without fluency and perplexity reuses a full run's pre-edit scores, without those two
    quick = evaluate(model, tok, Boost(alpha=12.0), REQUESTS[:2], mode="single", ppl_path=ppl_text,
                     reuse_pre=back, **{**CFG, "fluency": False, "perplexity": False})
    assert not any(k.startswith("fluency/") for k in quick.summary["pre"])
    assert math.isnan(quick.summary["pre"].get("general/ppl", math.nan))  # not measured, as in a quick run
    assert quick.summary["pre"]["rewrite/es"] == pytest.approx(es_pre)
    assert back.per_request[0]["pre"].get("fluency/ngram_entropy") is not None  # the reused results are kept
    with pytest.raises(ValueError, match="other settings"):  # the other way round is refused
        evaluate(model, tok, Boost(), REQUESTS[:2], ppl_path=ppl_text, reuse_pre=quick, **CFG)


def test_encoder_decoder_is_scored(tiny, ppl_text):
    model, tok = tiny("t5")
    scorer = Scorer(model, tok, EvalConfig(fluency_new_tokens=4, ppl_path=ppl_text))
    out, refs = scorer.score(REQUESTS[:2])
    assert out[0]["neighborhood/kl"] == 0.0 and 0.0 <= out[0]["rewrite/acc"] <= 1.0
    assert math.isnan(scorer.perplexity()[0])  # perplexity is defined for decoder-only models
    prompts, answers = ["The capital of France is", "Toko Yasuda plays"], ["Paris", "the guitar"]
    folded = score_targets(model, tok, prompts, answers, next_of=[1, 0]).next_logp
    alone = next_token_logprobs(model, tok, prompts)
    assert torch.allclose(folded, alone[[1, 0]], atol=1e-5)


def test_query_rows_and_identical_rows_scored_once(tiny, monkeypatch):
    """One row per (prompt, target, kind) in the reference order; a group with a repeated
    request runs each distinct row once and scores both copies like the request alone."""
    import kedit.eval.scorer as scorer_mod

    r = REQUESTS[0]
    rows = queries([r])
    assert [(q.split, q.kind) for q in rows[:3]] == [("rewrite", "new"), ("rewrite", "true"), ("rewrite", "gen")]
    assert [(q.kind, q.target) for q in rows if q.split == "neighborhood"][:3] == [
        ("true", "Berlin"), ("new", "Rome"), ("gen", "Berlin")]
    assert [q.split for q in queries([r], light=True, generation=False)] == ["rewrite", "rewrite"]
    forced = len({(q.prompt, q.target) for q in rows if q.kind != "gen"})
    assert forced == sum(q.kind != "gen" for q in rows) - 1  # "Italy ... Rome" is both the true and the new answer
    model, tok = tiny("llama")
    seen, real = [], scorer_mod.score_targets
    monkeypatch.setattr(scorer_mod, "score_targets", lambda m, t, prompts, *a, **k: seen.append(len(prompts))
                        or real(m, t, prompts, *a, **k))
    scorer = Scorer(model, tok, EvalConfig(perplexity=False, fluency=False))
    alone, _ = scorer.score([r])
    twice, refs = scorer.score([r, r])
    assert seen == [forced, forced]
    assert twice[0] == twice[1] == pytest.approx(alone[0], nan_ok=True)
    assert torch.equal(refs[0].next_logp, refs[1].next_logp) and refs[0].next_logp.shape[0] == len(r.neighborhood)


def test_bad_mode_and_empty(tiny):
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate(model, tok, Boost(), REQUESTS, mode="parallel")
    for empty in ([], ()):
        with pytest.raises(ValueError, match="no requests to evaluate"):
            evaluate(model, tok, Boost(), empty, progress=False)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_files(tiny, tmp_path):
    """A saved tiny llama and a 3-record CounterFact file: (model folder, data file)."""
    model, tok = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = [{"case_id": i, "requested_rewrite": {
        "prompt": prompt, "subject": subject, "relation_id": "P0",
        "target_new": {"str": new}, "target_true": {"str": true}},
        "paraphrase_prompts": [f"In short, {prompt.format(subject)}"],
        "neighborhood_prompts": ["The capital of Italy is"], "attribute_prompts": [],
        "generation_prompts": [f"{subject} is"]}
        for i, (prompt, subject, new, true) in enumerate([
            ("The capital of {} is", "France", "Rome", "Paris"),
            ("{} plays", "Toko Yasuda", "soccer", "guitar"),
            ("{} plays", "Michael Jordan", "guitar", "basketball")])]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    return tmp_path / "model", tmp_path / "cf.json"


def test_cli_smoke(cli_files, tmp_path, capsys, ppl_text):
    from kedit.evaluate import main

    out = tmp_path / "res.json"
    argv = ["--model", str(cli_files[0]), "--editor", "ft-m", "--hparams.num_steps", "3", "--hparams.lr=1e-2",
            "--data", str(cli_files[1]), "--mode", "sequential", "--limit", "3", "--out", str(out),
            "--plot", str(tmp_path / "curve.png"), "--eval.ppl_path", ppl_text, "--eval.ppl_tokens", "32",
            "--eval.fluency_new_tokens", "8", "--quiet", "--device", "cpu", "--checkpoint", str(tmp_path / "ck")]
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.json").write_text('{"kedit_checkpoint": 1}')
    assert main(argv) == 2  # found once the editor is made (after the model's loading bar)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("ck/state.json: field 'match' is missing") and err.startswith("python -m kedit.evaluate: error")
    (tmp_path / "ck" / "state.json").unlink()
    assert main(argv) == 0
    assert not (tmp_path / "ck").exists()  # the checkpoint of a finished run is removed
    stdout = capsys.readouterr().out
    assert "| metric | pre | post | n |" in stdout and "rewrite/es" in stdout
    data = json.loads(out.read_text())
    assert data["meta"]["n_requests"] == 3 and data["meta"]["hparams"]["num_steps"] == 3
    assert data["meta"]["hparams"]["lr"] == 1e-2 and data["meta"]["config"]["ppl_tokens"] == 32
    assert data["meta"]["mode"] == "sequential" and len(data["curves"]) >= 2
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert main(argv[:4] + ["--hparams.nonsense", "1"] + argv[8:]) == 2
    _one_line_error(capsys, "unrecognized arguments: --hparams.nonsense 1", "--editor NAME --help lists them")
    assert main(argv[:4] + ["--hparams.num_steps", "many"] + argv[8:]) == 2
    _one_line_error(capsys, 'Parser key "hparams.num_steps"', "many")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--editor" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--editor", "ft-m", "--help"])
    assert exc.value.code == 0
    assert "--hparams.num_steps" in capsys.readouterr().out  # the editor's hyperparameters are the CLI


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("python -m kedit.evaluate: error: ")
    for part in parts:
        assert part in err
    return err


@pytest.mark.parametrize("case", ["model", "untrained mend", "unknown editor", "data", "bad record", "out",
                                  "checkpoint"])
def test_cli_user_errors_are_one_line(cli_files, tmp_path, capsys, monkeypatch, case):
    """Expected user errors: exit code 2 and one line naming the problem, before any work."""
    import kedit.eval
    from kedit.evaluate import main

    monkeypatch.setattr(kedit.eval, "evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "A is", "target_new": "\ud800"}]))
    model, data = cli_files
    base = {"--model": str(model), "--editor": "ft-m", "--data": str(data), "--out": str(tmp_path / "r.json")}
    change, parts = {
        "model": ({"--model": "nosuch-model"}, ["no model 'nosuch-model'", "smollm2-135m, gemma3-270m"]),
        "untrained mend": ({"--editor": "mend"}, ["--editor mend", "checkpoints/mend-smollm2-135m-counterfact"]),
        "unknown editor": ({"--editor": "nosuch"}, ["--editor 'nosuch': neither a registered editor"]),
        "data": ({"--data": str(tmp_path / "none.json")}, ["no data file at"]),
        "bad record": ({"--data": str(tmp_path / "bad.json")}, ["record 0, field 'target_new'", "lone surrogate"]),
        "out": ({"--out": str(blocker / "r.json")}, [f"--out {blocker / 'r.json'}: cannot write"]),
        "checkpoint": ({"--checkpoint": str(tmp_path / "ck")}, ["--checkpoint: only sequential runs", "single"]),
    }[case]
    argv = [x for k, v in {**base, **change}.items() for x in (k, v)] + ["--quiet", "--device", "cpu"]
    assert main(argv) == 2
    _one_line_error(capsys, *parts)


def test_cli_prints_the_table_before_writing(cli_files, tmp_path, capsys, monkeypatch):
    """A results file that cannot be written at the end still leaves the table on stdout."""
    import kedit.atomic
    from kedit.evaluate import main

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kedit.atomic, "atomic_write_text", full_disk)
    out = tmp_path / "res.json"
    argv = ["--model", str(cli_files[0]), "--editor", "ft-m", "--hparams.num_steps", "1", "--data", str(cli_files[1]),
            "--limit", "1", "--out", str(out), "--eval.perplexity", "false", "--eval.generation", "false",
            "--eval.fluency", "false", "--quiet", "--device", "cpu"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "| metric | pre | post | n |" in captured.out and not out.exists()
    assert "No space left on device" in captured.err and "the table above has them" in captured.err


@pytest.mark.parametrize("login", [False, True])
def test_wandb_goes_online_after_wandb_login(tmp_path, monkeypatch, login):
    """W&B logging of an evaluation is online when `wandb login` wrote ~/.netrc, offline without."""
    import sys
    import types

    from kedit.eval.results import log_wandb

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password key\n" if login else "")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    calls = {}

    class Run:
        summary: dict = {}

        def log(self, values, step):
            calls.setdefault("steps", []).append(step)

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls.update(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    res = Results(summary={"pre": {"rewrite/es": 0.0}, "post": {"rewrite/es": 1.0}}, curves=[{"n_edits": 1}],
                  meta={"editor_name": "Boost", "mode": "sequential"})
    log_wandb(res, "proj", config={"editor": "boost"})
    assert calls["mode"] == ("online" if login else "offline") and calls["project"] == "proj"
    assert calls["config"]["editor"] == "boost" and calls["steps"] == [1] and calls["finished"]


def test_compare_markdown_edit_seconds_per_request():
    """A batch edit's seconds are shared by its requests: the comparison's per-request row divides them
    (a run saved without ``edit_seconds_per_request`` falls back to the per-edit mean)."""
    from kedit.eval.results import compare_markdown

    summary = {"pre": {"rewrite/es": 0.0}, "post": {"rewrite/es": 1.0}}
    batch = Results(summary=summary, meta={"edit_seconds_mean": 60.0, "edit_seconds_per_request": 20.0})
    old = Results(summary=summary, meta={"edit_seconds_mean": 9.0})
    row = next(line for line in compare_markdown({"batch": batch, "old": old}) if "edit seconds" in line)
    assert row == "| edit seconds / request | | 20.00 | 9.00 |"


# --------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_model_pre_edit_scores(smollm2):
    """SmolLM2 knows Paris and Berlin: before any edit, ES and generation success of the
    counterfactual "Rome" are 0, and the neighborhood is answered correctly."""
    model, tok = smollm2
    req = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", target_true="Paris",
                      neighborhood=[Probe("The capital of Germany is", "Berlin")])
    out, _ = Scorer(model, tok, EvalConfig(perplexity=False, fluency=False)).score([req])
    m = out[0]
    assert m["rewrite/es"] == 0.0 and m["rewrite/gen"] == 0.0 and m["rewrite/p_new"] < 0.05
    assert m["neighborhood/ns"] == 1.0 and m["neighborhood/gen"] == 1.0 and m["neighborhood/acc"] == 1.0
    ok = EditRequest(prompt="The capital of France is", target_new="Paris")
    assert Scorer(model, tok, EvalConfig(perplexity=False, fluency=False)).score([ok])[0][0]["rewrite/gen"] == 1.0

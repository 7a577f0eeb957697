"""ROME on facts SmolLM2 knows well: "The capital of X is" for 12 countries, under greedy decoding.

    OMP_NUM_THREADS=1 python bench/rome_capitals.py \\
        --hparams '{"paper": {}, "llama.yaml": "llama.yaml", "emmet": {"editor": "emmet"}}'

An entry with an ``"editor"`` key runs that registered editor (its dataclass defaults plus the
other keys) instead of ROME: EMMET's single edit is ROME's update with EMMET's value settings.

CounterFact's neighbourhood prompts are mostly facts a 135M model does not know (pre-edit NS
.71), so they say little about an edit spilling onto close subjects. Here each country's
capital is edited to the next country's capital in the list, one edit at a time (restored
after each), and the other 11 countries are the neighbours. Reported per configuration:
- efficacy: greedy decoding of the edit prompt starts with the new capital;
- paraphrase: the same for "The capital city of X is" and "X's capital city is" (only where
  the unedited model answers those with the true capital);
- neighbours kept: neighbours whose greedy answer is unchanged (the neighbour whose capital is
  the new target is left out: an answer that spills over there cannot be told apart);
- spill: neighbours that now answer with the edit's new capital;
- the Germany test: after the README's edit (France's capital -> Rome), the greedy answer to
  "The capital of Germany is" (Berlin when the edit keeps to France).

Writes bench/results/rome_capitals.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

from bench_rome import DATA, overrides, setup, write

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo",
            "England": "London", "Russia": "Moscow", "China": "Beijing", "Canada": "Ottawa", "Greece": "Athens",
            "Portugal": "Lisbon", "Austria": "Vienna"}
PROMPT = "The capital of {} is"
PARAPHRASES = ["The capital city of {} is", "{}'s capital city is"]


GERMANY_EDIT = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "target_true": "Paris"}
GERMANY_PROBE = "The capital of Germany is"


def germany_test(editor, model, tok) -> str:
    """The README's edit (France's capital -> Rome), then Germany's capital: the greedy answer."""
    from kedit.eval.scoring import generate

    edit = editor.edit(model, tok, GERMANY_EDIT)
    with edit.applied(model):
        return generate(model, tok, [GERMANY_PROBE], 4)[0].strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hparams", required=True,
                   help='JSON {name: ROME overrides, "llama.yaml", or {"editor": NAME, **overrides}}')
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args()

    from kedit import editor as registered_editor
    from kedit.editors.rome import ROME
    from kedit.eval.metrics import generation_match as says  # word-boundary match, as the evaluation's
    from kedit.eval.scoring import generate

    model, tok, _ = setup(args.threads)
    countries = list(CAPITALS)
    pre = dict(zip(countries, generate(model, tok, [PROMPT.format(c) for c in countries], 4)))
    wrong = [c for c in countries if not says(pre[c], CAPITALS[c])]
    if wrong:
        raise SystemExit(f"the unedited model does not answer the capital of {wrong}: {[pre[c] for c in wrong]}")
    pairs = [(c, q) for c in countries for q in PARAPHRASES]
    answers = generate(model, tok, [q.format(c) for c, q in pairs], 4)
    para_ok = {c: [q for (o, q), a in zip(pairs, answers) if o == c and says(a, CAPITALS[c])] for c in countries}
    common = dict(corpus=str(DATA / "corpus"), stats_tokens=args.stats_tokens)
    results, germany = {}, {}
    for name, over in json.loads(args.hparams).items():
        if isinstance(over, dict) and "editor" in over:
            editor = registered_editor(over["editor"], **common, **{k: v for k, v in over.items() if k != "editor"})
        else:
            editor = ROME(**common, **overrides(over, common))
        rows = []
        for i, c in enumerate(countries):
            target_country = countries[(i + 1) % len(countries)]
            new = CAPITALS[target_country]
            req = {"prompt": PROMPT.format(c), "subject": c, "target_new": new, "target_true": CAPITALS[c]}
            t0 = time.perf_counter()
            edit = editor.edit(model, tok, req)
            seconds = time.perf_counter() - t0
            neighbours = [o for o in countries if o not in (c, target_country)]
            with edit.applied(model):
                got = generate(model, tok, [PROMPT.format(c)] + [q.format(c) for q in para_ok[c]]
                               + [PROMPT.format(o) for o in neighbours], 4)
            own, paras, nb = got[0], got[1:1 + len(para_ok[c])], got[1 + len(para_ok[c]):]
            rows.append({"country": c, "new": new, "answer": own, "efficacy": says(own, new),
                         "paraphrase": [says(x, new) for x in paras],
                         "kept": sum(x == pre[o] for x, o in zip(nb, neighbours)), "neighbours": len(neighbours),
                         "spill": [o for x, o in zip(nb, neighbours) if says(x, new)], "seconds": seconds,
                         "steps": edit.info["v_steps"][0]})
            print(name, rows[-1], flush=True)
        results[name] = rows
        germany[name] = germany_test(editor, model, tok)
    md = ["### ROME on well-known facts: the capitals of 12 countries, SmolLM2-135M, greedy decoding", "",
          "| configuration | efficacy | paraphrase | neighbours kept | edits that spill | Germany test | s/edit |",
          "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, rows in results.items():
        paras = [x for r in rows for x in r["paraphrase"]]
        kept = sum(r["kept"] for r in rows) / sum(r["neighbours"] for r in rows)
        spill = [r for r in rows if r["spill"]]
        md.append(f"| {name} | {sum(r['efficacy'] for r in rows)}/{len(rows)} | {sum(paras)}/{len(paras)} | "
                  f"{kept:.3f} | {len(spill)} | {germany[name]!r} | {sum(r['seconds'] for r in rows) / len(rows):.1f} |")
    md.append("")
    for name, rows in results.items():
        spills = [f"{r['country']}→{r['new']} onto {', '.join(r['spill'])}" for r in rows if r["spill"]]
        md.append(f"- {name}: spill {'; '.join(spills) or 'none'}")
    md += ["", f"Overrides: {args.hparams}. Seconds on {args.threads} thread(s), machine load not controlled.", ""]
    md.append(f"Germany test: the answer to {GERMANY_PROBE!r} after {GERMANY_EDIT['prompt']!r} -> "
              f"{GERMANY_EDIT['target_new']} (Berlin: kept).")
    write("rome_capitals" + args.tag, {"results": results, "germany": germany, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()

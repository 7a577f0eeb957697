"""Why some ROME edits are not generated on their own prompt: the bare prompt's key.

    OMP_NUM_THREADS=1 python bench/rome_key_ratio.py --n 100 --results bench/results/rome_single.json

r-ROME's update ``ΔW = δ rᵀ`` with ``r = C⁻¹k* / (k*ᵀC⁻¹k*)`` gives exactly δ at the
template-averaged key ``k*``, and ``δ · (r·k_t)`` at a template's own key ``k_t``. For each
record this reports ``r·k_bare`` (the edit prompt without a prefix, what users query) and the
range of ``r·k_t`` over the other templates, split by whether the edited model generated the
target on the edit prompt in an earlier ``bench_rome.py --part single`` run. It also reports how
much larger ``rᵀCr`` (the expected squared disturbance of corpus keys, per unit ‖δ‖²) is for
``fit_templates=True``, which solves ``r·k_t = 1`` for every template.

Writes bench/results/rome_key_ratio.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench_rome import DATA, setup, write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "rome_single.json"),
                   help="a bench_rome single result on the same records (for the generation outcome)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from kedit.editors.locate import context_templates, subject_keys
    from kedit.editors.rome import ROME, fit_keys

    model, tok, reqs = setup(args.threads)
    reqs = reqs[: args.n]
    per = json.loads(Path(args.results).read_text())["results"]["per_request"]
    gen = {r["case_id"]: r["post"].get("rewrite/gen") for r in per}
    editor = ROME(corpus=str(DATA / "corpus"))
    layer = editor.layer(model)
    chol = editor.cov_factor(model, tok, layer)
    C = chol @ chol.T
    templates = context_templates(model, tok, editor.hparams.templates, editor.hparams.template_seed)
    rows = []
    for r in reqs:
        ks = torch.stack([subject_keys(model, tok, [r], [t], [layer])[0][layer][0] for t in templates]).double()
        right = fit_keys(ks.mean(0, keepdim=True), chol)  # r-ROME's C⁻¹k* / (k*ᵀC⁻¹k*)
        ratio = ks @ right
        fit = fit_keys(ks, chol, editor.hparams.fit_ridge)
        rows.append({"case_id": r.case_id, "gen": gen.get(r.case_id), "bare": float(ratio[0]),
                     "templates_min": float(ratio[1:].min()), "templates_max": float(ratio[1:].max()),
                     "cnorm_growth": float((fit @ C @ fit) / (right @ C @ right))})

    def stats(xs: list[float]) -> str:
        xs = sorted(xs)
        return f"{statistics.median(xs):.2f} ({xs[0]:.2f}–{xs[-1]:.2f})" if xs else "-"

    ok = [x for x in rows if x["gen"] == 1]
    bad = [x for x in rows if x["gen"] is not None and x["gen"] < 1]
    low = sorted(rows, key=lambda x: x["bare"])[:10]
    md = [f"### ROME's bare-prompt key, SmolLM2-135M layer {layer}, {len(rows)} CounterFact records", "",
          f"`r·k` = the share of δ the r-ROME update delivers at that key ({len(templates)} templates; "
          f"generation outcome from `{Path(args.results).name}`)", "",
          "| edits | n | r·k_bare, median (range) | r·k_t over the other templates, min / max (medians) |",
          "| --- | ---: | ---: | ---: |"]
    for name, group in (("generate the target", ok), ("do not", bad)):
        md.append(f"| {name} | {len(group)} | {stats([x['bare'] for x in group])} | "
                  f"{stats([x['templates_min'] for x in group])} / {stats([x['templates_max'] for x in group])} |")
    md += ["", f"The 10 lowest r·k_bare: {sum(1 for x in low if x['gen'] is not None and x['gen'] < 1)} of them "
               f"fail to generate the target.", "",
           f"`fit_templates=True` (r·k_t = 1 on every template, ridge {editor.hparams.fit_ridge}): rᵀCr grows "
           f"by a factor {stats([x['cnorm_growth'] for x in rows])} over the mean-key update.", ""]
    write("rome_key_ratio", {"rows": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()

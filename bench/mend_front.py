"""The MEND front (issue 17 §1): trained MEND editors side by side, from ``bench_mend.py`` results.

    python bench/mend_front.py --name mend_front \\
        --runs "c_loc 1 (shipped)=mend" "c_loc 10=mend_c10_best" "4 neighbours=mend_nb4_best"

Each ``NAME=STEM`` reads ``bench/results/STEM.json`` (``bench_mend.py --out bench/results/STEM``).
The columns are the post-edit scores on ``counterfact_dev_rome`` (the records ROME and MEMIT are
measured on; NS and agreement over its ten same-relation neighbours per record) and, after the
slash, on the edit split of ``counterfact_dev_mend``; the last column lists the goals of issue 17
a point misses on ``counterfact_dev_rome``: ES ≥ .95, paraphrase (PS) ≥ .80, agreement ≥ .90.
Writes ``bench/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
ROME, MEND = "counterfact_dev_rome", "counterfact_dev_mend[edit]"
METRICS = [("ES", "rewrite/es"), ("rewrite gen", "rewrite/gen"), ("PS", "paraphrase/es"),
           ("paraphrase gen", "paraphrase/gen"), ("NS", "neighborhood/ns"), ("agreement", "neighborhood/agree"),
           ("KL", "neighborhood/kl")]
GOALS = [("ES", "rewrite/es", 0.95), ("PS", "paraphrase/es", 0.80), ("agreement", "neighborhood/agree", 0.90)]


def row(stem: str) -> dict:
    report = json.loads((OUT / f"{stem}.json").read_text())
    sets = report["sets"]
    if ROME not in sets:
        raise SystemExit(f"{stem}.json: no {ROME} scores (bench_mend.py --n-rome 0?)")
    out = {"n": sets[ROME]["n"], "NS pre": sets[ROME]["pre"]["neighborhood/ns"], "editor": report["editor"],
           "edit ms": report["timing"]["edit_s"] * 1e3}
    for label, key in METRICS:
        out[label] = [sets[ROME]["post"].get(key), sets.get(MEND, {}).get("post", {}).get(key)]
    out["misses"] = ", ".join(g for g, key, bound in GOALS if (sets[ROME]["post"].get(key) or 0) < bound) or "none"
    return out


def cell(value) -> str:
    if isinstance(value, list):
        return " / ".join("-" if v is None else f"{v:.3f}" for v in value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="NAME=STEM of bench/results/STEM.json")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    rows = {name: row(stem) for name, stem in (x.split("=", 1) for x in args.runs)}
    cols = [label for label, _ in METRICS] + ["NS pre", "edit ms", "misses"]
    md = [f"### MEND editors for SmolLM2-135M: {ROME} / {MEND}, post-edit", "",
          "| editor | n | " + " | ".join(cols) + " |", "| --- | ---: |" + " ---: |" * len(cols)]
    for name, r in rows.items():
        md.append(f"| {name} | {r['n']} | " + " | ".join(cell(r[c]) for c in cols) + " |")
    md += [""] + [f"- {name}: `{r['editor']}`" for name, r in rows.items()] + [""]
    (OUT / f"{args.name}.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    (OUT / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

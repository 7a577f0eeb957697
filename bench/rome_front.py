"""The table of ROME variants measured with ``bench_rome.py --part single`` (issue 20: the front
between speed, paraphrase generation and specificity), paired on the same first records.

    python bench/rome_front.py --n 30 --name rome_general_30 \\
        --runs paper=rome_single llama.yaml=rome_single_q30_llama p0.7=rome_single_q30_p07

Each ``NAME=STEM`` reads ``bench/results/STEM.json`` and keeps its first ``--n`` records (every
run must hold them). ``--speed STEM`` adds each name's seconds per edit as a ratio to
``llama.yaml``'s from one ``--part configs`` run (its names must match); ``--capitals STEM``
adds the capitals check of a ``rome_capitals.py`` run (same names). The last column lists
the goals of issue 20 that a variant misses (ES ≥ .99, rewrite generation ≥ .95, PS ≥ .97,
paraphrase generation ≥ .70, NS ≥ pre − .02, agreement ≥ .97; with the capitals run: no
spill, neighbours kept ≥ .98, the Germany test). Writes ``bench/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
METRICS = [("ES", "rewrite/es"), ("rewrite gen", "rewrite/gen"), ("PS", "paraphrase/es"),
           ("paraphrase gen", "paraphrase/gen"), ("NS", "neighborhood/ns"), ("agreement", "neighborhood/agree"),
           ("KL", "neighborhood/kl")]


def scores(stem: str, n: int) -> dict:
    payload = json.loads((OUT / f"{stem}.json").read_text())
    recs = payload["results"]["per_request"]
    if len(recs) < n:
        raise SystemExit(f"{stem}.json: {len(recs)} records, fewer than --n {n}")
    recs = recs[:n]
    row = {label: statistics.mean(r["post"][key] for r in recs) for label, key in METRICS}
    row["NS pre"] = statistics.mean(r["pre"]["neighborhood/ns"] for r in recs)
    row["s/edit (own run, load differs)"] = statistics.mean(r["edit_seconds"] for r in recs)
    row["hparams"] = payload.get("args", {}).get("hparams", "{}")  # older runs: the paper's settings
    return row


GOALS = [("ES", lambda r: r["ES"] >= 0.99), ("rewrite gen", lambda r: r["rewrite gen"] >= 0.95),
         ("PS", lambda r: r["PS"] >= 0.97), ("paraphrase gen", lambda r: r["paraphrase gen"] >= 0.70),
         ("NS", lambda r: r["NS"] >= r["NS pre"] - 0.02), ("agreement", lambda r: r["agreement"] >= 0.97),
         ("spill", lambda r: r.get("spill", 0) == 0), ("kept", lambda r: r.get("kept", 1.0) >= 0.98),
         ("Germany", lambda r: r.get("Germany", "Berlin").startswith("Berlin"))]


def capitals(stem: str) -> dict:
    """{name: spill count, neighbours kept, Germany answer} of a rome_capitals.py result."""
    payload = json.loads((OUT / f"{stem}.json").read_text())
    out = {}
    for name, rows in payload["results"].items():
        kept = sum(r["kept"] for r in rows) / sum(r["neighbours"] for r in rows)
        out[name] = {"spill": sum(bool(r["spill"]) for r in rows), "kept": kept}
        if name in payload.get("germany", {}):
            out[name]["Germany"] = payload["germany"][name]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="NAME=STEM of bench/results/STEM.json")
    p.add_argument("--n", type=int, required=True, help="the first N records of every run")
    p.add_argument("--speed", default=None, help="STEM of a bench_rome.py --part configs result")
    p.add_argument("--capitals", default=None, help="STEM of a rome_capitals.py result")
    p.add_argument("--name", required=True)
    args = p.parse_args()
    rows = {name: scores(stem, args.n) for name, stem in (x.split("=", 1) for x in args.runs)}
    if args.speed:
        times = json.loads((OUT / f"{args.speed}.json").read_text())["times"]
        ref = statistics.mean(times["llama.yaml"])
        for name, row in rows.items():
            if name in times:
                row["time ratio"] = statistics.mean(times[name]) / ref
    if args.capitals:
        for name, cap in capitals(args.capitals).items():
            if name in rows:
                rows[name].update(cap)
    for row in rows.values():
        row["misses"] = ", ".join(goal for goal, ok in GOALS if not ok(row)) or "none"
    cols = [label for label, _ in METRICS] + ["NS pre", "time ratio", "spill", "kept", "Germany", "misses"]
    md = [f"### ROME variants on the first {args.n} CounterFact dev records, SmolLM2-135M layer 5", "",
          "| variant | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, row in rows.items():
        cells = [("-" if c not in row else f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]))
                 for c in cols]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += [""] + [f"- {name}: `{row['hparams']}`" for name, row in rows.items()] + [""]
    (OUT / f"{args.name}.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    (OUT / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

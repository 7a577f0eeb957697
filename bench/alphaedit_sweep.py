"""AlphaEdit on SmolLM2-135M: why does the paper's null-space setting edit weakly, and which
threshold / L2 restores it? One batch of CounterFact records, MEMIT as the reference.

    python bench/alphaedit_sweep.py --n 50 --threads 1

The values z (MEMIT Eq. 16) do not depend on the null-space threshold or L2 for the first
edit of an unedited model, so they are optimized once and reused by every configuration
(the sweep's only shortcut). For each layer it reports the null-space dimension and the
fraction of the new keys' energy ‖P k‖² / ‖k‖² that lies in it. Writes
bench/results/alphaedit_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from kedit import paths

HERE = Path(__file__).resolve().parent
DATA = paths.data_dir(required=True)  # the development data: $KEDIT_DATA (kedit.paths)
CF = DATA / "counterfact" / "counterfact_dev_rome.json"
OUT = HERE / "results"
KEYS = ["rewrite/es", "rewrite/acc", "paraphrase/es", "neighborhood/ns", "neighborhood/agree", "neighborhood/kl",
        "general/ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--thresholds", type=float, nargs="+", default=[2e-2, 1e-1, 5e-1])
    p.add_argument("--l2", type=float, nargs="+", default=[10.0, 1.0, 0.1])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    import kedit
    from kedit.data import load_requests
    from kedit.editors.alphaedit import null_space_projection
    from kedit.editors.locate import context_templates, subject_keys
    from kedit.eval import evaluate
    from value_cache import shared_values

    model, tok = kedit.load_model("smollm2-135m")
    reqs = load_requests(CF)[: args.n]

    common = dict(generation=False, fluency=False, progress=False)
    rows, pre = [], None

    def run(name: str, **hp) -> None:
        nonlocal pre
        editor = shared.editor(name, corpus=str(DATA / "corpus"), **hp)
        t0 = time.perf_counter()
        res = evaluate(model, tok, editor, reqs, mode="batch", reuse_pre=pre, **common)
        pre = pre or res
        post = res.summary["post"]
        row = {"editor": name, **hp, "seconds": time.perf_counter() - t0, **{k: post.get(k) for k in KEYS}}
        rows.append(row)
        logging.info("%s", row)

    # the new keys and their energy in each layer's null space
    probe = kedit.editor("alphaedit", corpus=str(DATA / "corpus"))
    layers = probe.layers(model)
    covs = probe.second_moments(model, tok, layers)
    templates = context_templates(model, tok, probe.hparams.templates, probe.hparams.template_seed)
    keys, _ = subject_keys(model, tok, reqs, templates, layers)
    energy = []
    for t in args.thresholds:
        for layer in layers:
            P = null_space_projection(covs[layer], t)
            K = keys[layer].double()
            frac = float((K @ P).norm() ** 2 / K.norm() ** 2)
            ev = torch.linalg.eigvalsh(covs[layer].double())
            energy.append({"threshold": t, "layer": layer, "null_dim": int(torch.trace(P).round()),
                           "d_in": P.shape[0], "key_energy_in_null": frac,
                           "eig_median": float(ev.median()), "eig_max": float(ev.max()),
                           "key_sq_norm_mean": float((K * K).sum(-1).mean())})
            logging.info("%s", energy[-1])

    with shared_values() as shared:
        run("memit")
        for t in args.thresholds:
            for l2 in args.l2:
                run("alphaedit", nullspace_threshold=t, L2=l2)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "alphaedit_sweep.json").write_text(json.dumps({"args": vars(args), "energy": energy, "runs": rows,
                                                         "pre": pre.summary["pre"]}, indent=1, default=str))
    md = [f"# AlphaEdit null-space threshold × L2 on SmolLM2-135M: one batch of {len(reqs)} CounterFact records\n",
          "`python bench/alphaedit_sweep.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                        if not isinstance(v, list)) + "`\n",
          "| threshold | layer | null dim / d_in | new-key energy in null space | median eig(C) | max eig(C) | mean ‖k‖² |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for e in energy:
        md.append(f"| {e['threshold']:g} | {e['layer']} | {e['null_dim']} / {e['d_in']} | {e['key_energy_in_null']:.3f} "
                  f"| {e['eig_median']:.3g} | {e['eig_max']:.3g} | {e['key_sq_norm_mean']:.3g} |")
    md += ["", "| editor | threshold | L2 | " + " | ".join(KEYS) + " |", "|---|---:|---:|" + "---:|" * len(KEYS)]
    prerow = pre.summary["pre"]
    md.append("| pre-edit | | | " + " | ".join(f"{prerow.get(k, float('nan')):.3f}" for k in KEYS) + " |")
    for r in rows:
        md.append(f"| {r['editor']} | {r.get('nullspace_threshold', '')} | {r.get('L2', '')} | "
                  + " | ".join(f"{r[k]:.3f}" if r[k] is not None else "–" for k in KEYS) + " |")
    (OUT / "alphaedit_sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

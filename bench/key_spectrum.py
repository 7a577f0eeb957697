"""Is there a null space for AlphaEdit to edit in? The spectrum of the MLP keys.

    OMP_NUM_THREADS=1 python bench/key_spectrum.py --layers 4 5 6 7 8 --tokens 20000

AlphaEdit projects MEMIT's update onto the null space of the preserved keys K₀, taken as the
eigenvectors of the second-moment statistics ``C = E[k kᵀ]`` with eigenvalue below a threshold
(the paper: 1e-2 / 2e-2 on LLaMA3-8B, GPT-J and GPT2-XL). The method relies on K₀ being close to
low-rank, so that a subspace exists that holds almost none of the preserved keys' energy and
yet has room for the edits' keys. This reports, per layer, how many eigen-directions hold
50-99% of the keys' energy, the null space's dimension at the threshold and the share of
energy it holds, the participation ratio ``(Σλ)² / Σλ²``, and the same shares for the keys of
CounterFact subjects (what the edits write to).

Writes bench/results/key_spectrum.{json,md}.
"""

from __future__ import annotations

import argparse

import torch

from bench_rome import DATA, setup, write


def spectrum(C: torch.Tensor, threshold: float, edit_keys: torch.Tensor | None = None) -> dict:
    ev, U = torch.linalg.eigh(C.double())
    ev, U = ev.flip(0), U.flip(1)  # descending
    total = ev.sum()
    cum = ev.cumsum(0) / total
    null = ev < threshold
    tail = cum > 0.99  # the directions beyond 99% of the energy
    extra = {}
    if edit_keys is not None:  # share of the edit keys' energy in those subspaces
        e = (edit_keys.double() @ U) ** 2
        extra = {"edit_null_energy": float(e[:, null].sum() / e.sum()),
                 "edit_tail_energy": float(e[:, tail].sum() / e.sum())}
    return {
        "d": len(ev),
        **{f"dims_{q}": int((cum < q / 100).sum()) + 1 for q in (50, 90, 99)},
        "null_dim": int(null.sum()),
        "null_energy": float(ev[null].sum() / total),
        "median_eigenvalue": float(ev.median()),
        "participation_ratio": float(total ** 2 / (ev ** 2).sum()),
        "tail_dim": int(tail.sum()),
        **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    p.add_argument("--tokens", type=int, default=20_000, help="statistics tokens (the AlphaEdit runs' setting)")
    p.add_argument("--threshold", type=float, default=2e-2, help="AlphaEdit's null-space threshold")
    p.add_argument("--records", type=int, default=100, help="CounterFact records whose subject keys are compared")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from kedit.editors.locate import context_templates, subject_keys
    from kedit.stats import second_moments

    model, tok, reqs = setup(args.threads)
    covs = second_moments(model, tok, args.layers, str(DATA / "corpus"), n_tokens=args.tokens)
    # the keys MEMIT/AlphaEdit edit: subject's last token, averaged over the llama config's templates
    templates = context_templates(model, tok, [(10, 5)], 0)
    keys, _ = subject_keys(model, tok, reqs[: args.records], templates, args.layers)
    rows = {layer: spectrum(covs[layer], args.threshold, keys[layer]) for layer in args.layers}
    d = next(iter(rows.values()))["d"]
    md = [f"### MLP-key spectrum of SmolLM2-135M (d_in {d}), {args.tokens} corpus tokens", "",
          f"| layer | dims for 50% / 90% / 99% of the energy | null space at {args.threshold:g}: dims | "
          "its share of the corpus keys' / the edit keys' energy | last 1% of the energy: dims | "
          "the edit keys' share there | participation ratio |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for layer, r in rows.items():
        md.append(f"| {layer} | {r['dims_50']} / {r['dims_90']} / {r['dims_99']} | {r['null_dim']} | "
                  f"{r['null_energy']:.1%} / {r['edit_null_energy']:.1%} | {r['tail_dim']} | "
                  f"{r['edit_tail_energy']:.1%} | {r['participation_ratio']:.0f} |")
    md += ["", f"Edit keys: the subject keys of the first {args.records} records of counterfact_dev_rome.json "
               f"(averaged over {len(templates)} templates, as configs/alphaedit/llama.yaml).", ""]
    write("key_spectrum", {"layers": rows, "args": vars(args)}, "\n".join(md))


if __name__ == "__main__":
    main()

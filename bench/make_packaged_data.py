"""Build the small data that ships inside the kedit package (``kedit/resources``).

    KEDIT_DATA=../shared/data python bench/make_packaged_data.py

Writes, from the large development data (``$KEDIT_DATA``):

* ``corpus/wikipedia_stats.jsonl``: the first whole articles of ``corpus/wikipedia_en_sample_00.jsonl``
  until they hold ``--stats-tokens`` SmolLM2 tokens. The statistics code reads articles in order,
  so ``n_tokens`` up to that many give the same second moments as the full sample folder.
* ``corpus/wikipedia_held.jsonl``: the first ``--held-docs`` articles of ``wikipedia_en_sample_01.jsonl``
  (disjoint from the above), each cut to its first ``--held-chars`` characters at a word boundary:
  held text for perplexity. The evaluation reads 4 documents x 256 tokens by default, well inside.
* ``counterfact_sample.json``: the first ``--records`` records of ``counterfact/counterfact_dev_rome.json``
  (ROME schema, unchanged).

Sources and licences: ``kedit/resources/NOTICE.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kedit import paths

OUT = Path(__file__).resolve().parents[1] / "kedit" / "resources"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def chunked_tokens(tok, text: str, seq_len: int = 256, min_len: int = 8) -> int:
    """Tokens the statistics code takes from one article (its chunks of at least ``min_len``)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = seq_len - bool(getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None)
    return sum(len(ids[i:i + step]) for i in range(0, len(ids), step) if len(ids[i:i + step]) >= min_len)


def cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"title": row["title"], "text": row["text"]}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stats-tokens", type=int, default=40_000)
    ap.add_argument("--held-docs", type=int, default=16)
    ap.add_argument("--held-chars", type=int, default=4_000)
    ap.add_argument("--records", type=int, default=48)
    args = ap.parse_args()
    data = paths.data_dir(required=True)
    from kedit.models import load_model

    _, tok = load_model("smollm2-135m")
    stats, total = [], 0
    for row in read_jsonl(data / "corpus" / "wikipedia_en_sample_00.jsonl"):
        if total >= args.stats_tokens:
            break
        stats.append(row)
        total += chunked_tokens(tok, row["text"])
    held = [{**row, "text": cut(row["text"], args.held_chars)}
            for row in read_jsonl(data / "corpus" / "wikipedia_en_sample_01.jsonl")[: args.held_docs]]
    assert not {r["title"] for r in stats} & {r["title"] for r in held}, "stats and held text overlap"
    write_jsonl(OUT / "corpus" / "wikipedia_stats.jsonl", stats)
    write_jsonl(OUT / "corpus" / "wikipedia_held.jsonl", held)
    records = json.loads((data / "counterfact" / "counterfact_dev_rome.json").read_text(encoding="utf-8"))
    (OUT / "counterfact_sample.json").write_text(
        json.dumps(records[: args.records], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"stats corpus: {len(stats)} articles, {total} tokens; held text: {len(held)} articles; "
          f"records: {args.records}")
    print("titles (stats):", "; ".join(r["title"] for r in stats))
    print("titles (held):", "; ".join(r["title"] for r in held))


if __name__ == "__main__":
    main()

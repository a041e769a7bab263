"""Corpus v2's blind reader: a reader who sees stories without their labels names the
emotion of each (one guess and four more), and we count how often it names the one the
story was written for. A corpus gate: if people cannot name it, no probe should.

    python benchmarks/blind_reader.py make  --per 5 --parts 3    # writes blind/part*.txt + blind/key.json
    (readers write blind/answers*.txt: one line "b0001: guess | alt, alt, alt, alt" per story)
    python benchmarks/blind_reader.py score                      # -> benchmarks/results/blind_reader.json
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from probes import handwritten
from probes.corpus import emotions
from probes.evaluate import HEADLINE, families

HERE = Path(__file__).parent
BLIND = HERE / "blind"


def make(per: int, parts: int, seed: int = 0) -> None:
    """``per`` stories of each emotion, drawn from its first 20 (written first by every writer)."""
    table = {r["id"]: r for r in handwritten.load_assignments()}
    rng = random.Random(seed)
    picked = []
    for path in sorted((handwritten.V2 / "stories").glob("*.txt")):
        blocks = [(i, t) for i, t in handwritten.parse_blocks(path).items() if t and int(i.split("/")[1]) < 20]
        picked += rng.sample(blocks, min(per, len(blocks)))
    rng.shuffle(picked)
    key = {}
    BLIND.mkdir(exist_ok=True)
    for p in range(parts):
        lines = []
        for n, (tid, text) in enumerate(picked[p::parts]):
            bid = f"b{p}{n:03d}"
            key[bid] = table[tid]["emotion"]
            lines.append(f"## {bid}\n{' '.join(text.split())}\n")
        (BLIND / f"part{p}.txt").write_text("\n".join(lines))
    (BLIND / "key.json").write_text(json.dumps(key, indent=0))
    print(f"{len(key)} stories in {parts} parts under {BLIND}")


def score() -> dict:
    key = json.loads((BLIND / "key.json").read_text())
    labels = emotions()
    fam = dict(zip(labels, families(labels)))
    guesses = {}
    for path in sorted(BLIND.glob("answers*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(b\d+)\s*:\s*(.+)$", line)
            if m:
                first, _, rest = m[2].partition("|")
                guesses[m[1]] = [first.strip().lower()] + [g.strip().lower() for g in rest.split(",") if g.strip()]
    answered = [b for b in key if b in guesses]
    top1 = [guesses[b][0] == key[b] for b in answered]
    top5 = [key[b] in guesses[b][:5] for b in answered]
    family = [fam.get(guesses[b][0], -2) == fam[key[b]] for b in answered]
    head = [b for b in answered if key[b] in HEADLINE]
    out = {"stories": len(key), "answered": len(answered), "top1": sum(top1) / max(len(answered), 1),
           "top5": sum(top5) / max(len(answered), 1), "family_top1": sum(family) / max(len(answered), 1),
           "headline_top1_over_171": sum(guesses[b][0] == key[b] for b in head) / max(len(head), 1),
           "chance_top1": 1 / len(labels), "unknown_words": sorted({g for b in answered for g in guesses[b]} - set(labels)),
           "reader": "a subagent that saw only the shuffled story texts and the 171 words"}
    (HERE / "results" / "blind_reader.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "unknown_words"}, indent=1))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make", "score"])
    ap.add_argument("--per", type=int, default=5)
    ap.add_argument("--parts", type=int, default=3)
    a = ap.parse_args()
    make(a.per, a.parts) if a.what == "make" else score()

"""Which writer gives better emotion vectors for the reading model?

Reads two raw generation files (same jobs, different writer models) with the reading
model, applies the same leak filter, and compares held-out-topic top-1/top-5 of the
emotion vectors on the emotions both cover, at every layer. Writes JSON.

    python benchmarks/compare_writers.py RAW_A RAW_B --neutral CORPUS --out results/writers.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from probes import corpus
from probes.build import heldout_vectors, read_activations
from probes.models import load_model
from probes.vectors import topk_accuracy


def stories(raw: Path, ids: set[str] | None = None) -> tuple[dict, dict]:
    out, stats = {}, {"stories": 0, "leaked": 0, "dropped": 0}
    for r in corpus.read_jsonl_raw(raw):
        if r["kind"] != "story" or (ids is not None and r["id"] not in ids):
            continue
        stats["stories"] += 1
        text, leaked = corpus.clean_story(r["raw"], r["emotion"])
        stats["leaked"] += leaked
        if text is None:
            stats["dropped"] += 1
            continue
        out[r["id"]] = {**r, "text": text}
    stats["leak_rate"] = stats["leaked"] / max(stats["stories"], 1)
    return out, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw_a")
    ap.add_argument("raw_b")
    ap.add_argument("--neutral", required=True, help="corpus (.jsonl.gz) whose neutral dialogues denoise")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the reading model")
    ap.add_argument("--out", default="benchmarks/results/writers.json")
    args = ap.parse_args()

    b_all, _ = stories(Path(args.raw_b))
    a, a_stats = stories(Path(args.raw_a), set(b_all))
    b, b_stats = stories(Path(args.raw_b), set(a))
    common = sorted(set(a) & set(b))  # same jobs kept by both filters: same emotions and topics
    neutral = [r["text"] for r in corpus.load_corpus(Path(args.neutral)) if r["kind"] == "neutral"]
    model, tok = load_model(args.model)
    labels = sorted({a[i]["emotion"] for i in common})
    y = np.array([labels.index(a[i]["emotion"]) for i in common])
    topics = sorted({a[i]["topic"] for i in common})
    groups = np.array([topics.index(a[i]["topic"]) for i in common])
    N = read_activations(model, tok, neutral, start=8).astype(np.float64)
    result = {"reader": args.model, "emotions": len(labels), "stories_each": len(common), "writers": {}}
    for name, rows, st in ((Path(args.raw_a).stem, a, a_stats), (Path(args.raw_b).stem, b, b_stats)):
        X = read_activations(model, tok, [rows[i]["text"] for i in common], start=8).astype(np.float64)
        sweep = []
        for k in range(X.shape[1]):
            sc = heldout_vectors(X[:, k], y, groups, N[:, k], len(labels), folds=3)
            sweep.append({"layer": k, "top1": topk_accuracy(sc, y, 1), "top5": topk_accuracy(sc, y, 5)})
        best = max(sweep, key=lambda s: s["top1"])
        mean_words = float(np.mean([len(rows[i]["text"].split()) for i in common]))
        result["writers"][name] = {"writer": rows[common[0]].get("writer"), "filter": st, "best": best,
                                   "mean_words": mean_words, "sweep": sweep}
    result["chance_top1"] = 1 / len(labels)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, w in result["writers"].items():
        print(f"{name}: best layer {w['best']['layer']} top-1 {w['best']['top1']:.3f} top-5 {w['best']['top5']:.3f}, "
              f"leak rate {w['filter']['leak_rate']:.2f}, {w['mean_words']:.0f} words")


if __name__ == "__main__":
    main()

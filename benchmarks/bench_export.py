"""How fast do the ONNX exports read text, and how faithfully? Tokens/s scanning the same
stories, in the same run, with the same batches:

- (a) naive: torch, full forward with ``output_hidden_states=True`` (every layer and the
  LM head), the read layer's states through the bank's head;
- (b) torch prefix: ``TorchReader`` (forward stops at the read layer);
- (c) ``monitor.onnx`` (fp32) and (d) ``monitor.int8.onnx`` through ``exporters.load``;
- head only: ``head.onnx`` latency for 1 and 1,024 tokens.

Ratios are against (a) measured in the same run; each method's best of ``--repeats``
interleaved rounds (background load hits every method alike). Also reports parity
(fp32 vs torch) and int8 fidelity (Spearman of the n scores per token, same top-3).

    python benchmarks/bench_export.py [--run runs/default] --out benchmarks/results/export.json

Without a run holding a bank, a random bank of the real shape (171 emotions at the
default read layer, z-scored on real activations) is exported to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import exporters
from exporters.export import fidelity
from probes import corpus
from probes.bank import ProbeBank
from probes.capture import default_read_layer, pad_batch, position_ids
from probes.models import fingerprint, load_model
from probes.reader import TorchReader


def stories(n: int, tok, max_tokens: int) -> list[list[int]]:
    rows = [r for r in corpus.load_corpus(corpus.shipped_corpus()) if r["kind"] == "story"]
    picked = rows[:: max(1, len(rows) // n)][:n]
    return [tok(r["text"])["input_ids"][:max_tokens] for r in picked]


def random_bank(model, tok, seqs, seed: int = 0) -> ProbeBank:
    """Random unit directions at the default read layer, z-scored on these texts."""
    rng = np.random.default_rng(seed)
    fp = fingerprint(model, tok)
    labels, d, L = corpus.emotions(), fp["hidden_size"], fp["layers"]
    n = len(labels)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    lv = unit(rng.normal(size=(L, n, d)))
    layer = default_read_layer(L)
    t = {"vectors": lv[layer], "directions": unit(rng.normal(size=(n, d))), "dim_mean": np.zeros(d, np.float32),
         "dim_scale": np.ones(d, np.float32), "probe_coef": np.zeros((n, d), np.float32),
         "probe_intercept": np.zeros(n, np.float32), "score_mean": np.zeros(n, np.float32),
         "score_std": np.ones(n, np.float32), "layer_vectors": lv}
    bank = ProbeBank(labels, layer, fp, t)
    raw = np.concatenate(TorchReader(model, tok, bank).score_ids(seqs[:8]))
    t.update(score_mean=raw.mean(0).astype(np.float32), score_std=raw.std(0).astype(np.float32))
    return bank


@torch.no_grad()
def naive(model, bank, seqs, pad_id, batch_size):
    """The obvious way: full forward with every hidden state, then the head."""
    W, b = (torch.from_numpy(a) for a in bank.head())
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [None] * len(seqs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        h = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                  output_hidden_states=True).hidden_states[bank.layer + 1]
        for row, i in enumerate(idx):
            out[i] = (h[row, :len(seqs[i])] @ W.T + b).numpy()
    return out


def max_diff(a, b) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def head_latency(head, d: int, tokens: int, repeats: int) -> float:
    h = np.random.default_rng(0).normal(size=(1, tokens, d)).astype(np.float32)
    head(h)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        head(h)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory with bank/ (and export/); default: a random bank")
    ap.add_argument("--texts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/export.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    run = Path(args.run) if args.run else None
    model, tok = load_model(ProbeBank.load(run).model["name"] if run else "smollm2-135m-instruct")
    seqs = stories(args.texts, tok, args.max_tokens)
    tmp = tempfile.TemporaryDirectory()
    if run is not None and (run / "bank").is_dir():
        bank, source = ProbeBank.load(run, fingerprint(model, tok)), f"{run}/bank"
    else:
        bank, source = random_bank(model, tok, seqs), "random (171 unit directions, z-scored on the texts)"
    export_s = None
    if run is not None and (run / "export" / "card.json").is_file():
        export = run / "export"
    else:
        export_s, export = timed(lambda: exporters.export_run(tmp.name, model, tok, bank, progress=False,
                                                              steering=False))
    readers = {"torch_prefix": TorchReader(model, tok, bank, batch_size=args.batch_size),
               "onnx_fp32": exporters.load(export, tok, threads=args.threads, batch_size=args.batch_size),
               "onnx_int8": exporters.load(export, tok, int8=True, threads=args.threads, batch_size=args.batch_size)}
    methods = {"naive_full_forward": lambda xs: naive(model, bank, xs, tok.pad_token_id or 0, args.batch_size),
               **{k: (lambda xs, r=r: r.score_ids(xs)) for k, r in readers.items()}}
    for fn in methods.values():  # warm up (allocations, onnxruntime's first-run planning)
        fn(seqs[:args.batch_size])
    best, scores = {}, {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            s, scores[name] = timed(lambda: fn(seqs))
            best[name] = min(best.get(name, s), s)
    n_tokens = sum(len(s) for s in seqs)
    base = n_tokens / best["naive_full_forward"]
    speed = {k: {"seconds": round(v, 3), "tokens_per_s": round(n_tokens / v, 1),
                 "ratio_vs_naive": round(n_tokens / v / base, 2)} for k, v in best.items()}
    head = exporters.load_head(export, threads=args.threads)
    d = bank.model["hidden_size"]
    card = json.loads((export / "card.json").read_text())
    drop_first = lambda xs: [x[1:] for x in xs]  # noqa: E731  (token 0: the attention sink)
    doc = {
        "model": bank.model["name"], "bank": source, "read_layer": bank.layer, "layers": bank.model["layers"],
        "labels": len(bank.labels), "texts": len(seqs), "tokens": n_tokens, "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats, "int8_scheme": card.get("int8_scheme"),
        "export_seconds": None if export_s is None else round(export_s, 1),
        "speed": speed,
        "head_latency_us": {"1_token": round(head_latency(head, d, 1, 300), 1),
                            "1024_tokens": round(head_latency(head, d, 1024, 30), 1)},
        "parity": {"fp32_vs_torch_max_abs_diff": max_diff(scores["onnx_fp32"], scores["torch_prefix"]),
                   "naive_vs_torch_max_abs_diff": max_diff(scores["naive_full_forward"], scores["torch_prefix"])},
        "int8_vs_fp32": fidelity(scores["onnx_fp32"], scores["onnx_int8"]),
        "int8_vs_fp32_without_first_token": fidelity(drop_first(scores["onnx_fp32"]), drop_first(scores["onnx_int8"])),
        "files_mb": {k: round(v["bytes"] / 1e6, 1) for k, v in card["files"].items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"{'method':<22} {'tokens/s':>10} {'x naive':>8}")
    for k, v in speed.items():
        print(f"{k:<22} {v['tokens_per_s']:>10.1f} {v['ratio_vs_naive']:>8.2f}")
    print(f"head.onnx latency: {doc['head_latency_us']['1_token']:.0f} us (1 token), "
          f"{doc['head_latency_us']['1024_tokens']:.0f} us (1,024 tokens)")
    f = doc["int8_vs_fp32"]
    print(f"int8 vs fp32: Spearman mean {f['spearman_mean']:.4f}, same top-3 on {f['top3_agreement']:.0%} of tokens; "
          f"fp32 vs torch max |diff| {doc['parity']['fp32_vs_torch_max_abs_diff']:.1e}")
    print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()

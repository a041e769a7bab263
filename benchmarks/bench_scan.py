"""How fast does `emoprobe scan` read agent logs? Tokens/s of the scanner against the
naive way, in the same run on the same conversations:

- naive: one conversation at a time, torch, full forward with ``output_hidden_states``
  (every layer and the LM head), the read layer's states through the bank's head;
- scan/torch: ``monitor.logscan.scan.scan`` end to end (render, tokenize, batched forward that
  stops at the read layer, per-message scores, flags, JSONL written), float32;
- scan/torch bfloat16: the same with the model in bfloat16 (the scan's default where the
  CPU has AMX/AVX512-BF16 units or on a GPU);
- scan/onnx and scan/onnx int8: the same with the ONNX readers, when the run has an export;
- scan/torch xN workers (with ``--workers N``; includes starting the workers).

Fidelity of each way against float32 torch on the same tokens: per-token Spearman over
the emotions (mean over tokens) and the share of tokens with the same top-3 emotions; and
the largest difference of per-message mean scores against the naive way. Writes JSON.

    python benchmarks/bench_scan.py --run runs/default --copies 3 --out benchmarks/results/scan.json
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monitor.logscan.readers import Conversation, read_logs
from monitor.logscan.scan import encode, make_rules, scan
from probes.bank import ProbeBank
from probes.models import fingerprint, load_model
from probes.reader import TorchReader

SAMPLES = Path(__file__).resolve().parents[1] / "monitor" / "samples"


def conversations(copies: int) -> list[Conversation]:
    base = [c for c in read_logs([SAMPLES / "agent_frantic.jsonl", SAMPLES / "agent_calm.jsonl"])
            if isinstance(c, Conversation)]
    return [Conversation(f"{c.id}/{k}", c.messages, c.source) for k in range(copies) for c in base]


def write_jsonl(convs: list[Conversation], path: Path) -> Path:
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps({"id": c.id, "messages": [{"role": m["role"], "content": m["content"]} for m in c.messages]}) + "\n")
    return path


@torch.no_grad()
def naive(model, tok, bank, convs) -> tuple[float, int, list[np.ndarray]]:
    """One conversation at a time, full forward with every hidden state."""
    W, b = (torch.from_numpy(x) for x in bank.head())
    t0, n, means = time.perf_counter(), 0, []
    for c in convs:
        enc = encode(tok, c)
        out = model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True)
        z = (out.hidden_states[bank.layer + 1][0].float() @ W.T + b).numpy()  # [0] is the embeddings
        means += [z[idx].mean(0) for idx in enc.members]
        n += len(enc.ids)
    return time.perf_counter() - t0, n, means


def timed_scan(path, reader, bank, rules, workers=1) -> tuple[float, int, list[np.ndarray], dict]:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        s = scan([path], Path(d) / "scan.jsonl", reader, bank=bank, rules=rules, workers=workers, progress=False)
        seconds = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(d) / "scan.jsonl").read_text().splitlines()]
    means = [np.array([ln["scores"][e] for e in bank.labels]) for ln in lines]
    return seconds, s["this_run"]["tokens"], means, s


def fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Per-token agreement of two readers' scores [tokens, emotions] on the same sequences."""
    from scipy.stats import spearmanr

    a, b = np.concatenate(ref), np.concatenate(got)
    rho = [spearmanr(x, y)[0] for x, y in zip(a, b)]
    top3 = np.mean([set(np.argsort(-x)[:3]) == set(np.argsort(-y)[:3]) for x, y in zip(a, b)])
    return {"spearman_per_token": round(float(np.mean(rho)), 4), "spearman_min": round(float(np.min(rho)), 4),
            "top3_same": round(float(top3), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/default", help="run directory (a random bank of the right shape if missing)")
    ap.add_argument("--copies", type=int, default=3, help="copies of the two sample transcripts")
    ap.add_argument("--workers", type=int, default=0, help="also time scan with this many worker processes")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each way (best kept)")
    ap.add_argument("--out", default="benchmarks/results/scan.json")
    args = ap.parse_args()

    model, tok = load_model()
    run = Path(args.run)
    if (run / "bank" / "bank.json").exists():
        bank = ProbeBank.load(run, fingerprint(model, tok))
    else:
        from bench_monitor import synthetic_bank

        bank, run = synthetic_bank(fingerprint(model, tok), 20), None
    reader, rules = TorchReader(model, tok, bank), make_rules(bank)
    convs = conversations(args.copies)
    tmp = Path(tempfile.mkdtemp())
    logs = write_jsonl(convs, tmp / "logs.jsonl")
    readers = {"scan_torch": reader, "scan_torch_bf16": TorchReader(load_model(dtype="bfloat16")[0], tok, bank)}
    if run is not None and (run / "export").is_dir():
        from exporters import load

        readers["scan_onnx"] = load(run)
        if (run / "export" / "monitor.int8.onnx").is_file():
            readers["scan_onnx_int8"] = load(run, int8=True)
    ways = {"naive": lambda: naive(model, tok, bank, convs)}
    ways.update({name: (lambda r=r: timed_scan(logs, r, bank, rules)[:3]) for name, r in readers.items()})
    naive(model, tok, bank, convs[:1])
    for r in readers.values():  # warm up every path
        timed_scan(logs, r, bank, rules)

    result = {"model": bank.model.get("name"), "layer": bank.layer, "bank": str(run) if run else "synthetic",
              "conversations": len(convs), "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
              "cpu": platform.processor() or platform.machine(), "ways": {}}
    best = {}
    for _ in range(args.repeats):  # interleaved, so background load hits every way alike
        for name, fn in ways.items():
            s, n, means = fn()
            if name not in best or s < best[name][0]:
                best[name] = (s, n, means)
    ids = [encode(tok, c).ids for c in convs]
    ref = reader.score_ids(ids)
    agree = {name: fidelity(ref, r.score_ids(ids)) for name, r in readers.items() if name != "scan_torch"}
    if args.workers > 1 and run is not None:
        from monitor.runs import open_reader

        threads = max(1, torch.get_num_threads() // args.workers)
        factory = functools.partial(open_reader, str(run), "torch", None, None, threads)
        best[f"scan_torch_x{args.workers}"] = timed_scan(logs, factory, bank, rules, args.workers)[:3]

    base = best["naive"][1] / best["naive"][0]
    for name, (s, n, means) in best.items():
        diff = max(float(np.abs(a - b).max()) for a, b in zip(means, best["naive"][2]))
        result["ways"][name] = {"seconds": round(s, 3), "tokens": n, "tokens_per_s": round(n / s, 1),
                                "speedup_vs_naive": round(n / s / base, 2), "max_abs_diff_vs_naive": round(diff, 4),
                                **({"vs_float32_torch": agree[name]} if name in agree else {})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""What does the live monitor cost? Generation time with the monitor attached (readout
hook + one alert rule checked every token, stop action armed) over generation time
without it, same run, interleaved repeats, batch 1 and 8. Writes JSON.

Two figures per batch size:
- end to end: median over repeats of (monitored / plain) for back-to-back pairs, the
  order alternating between pairs; on a shared CPU this is noisy at the 1% level, so
- CPU time of this process (same pairs): on a CPU this ignores time lost to other jobs;
- isolated: the monitor's own per-token work (readout + rule + bookkeeping), timed
  alone on the same device, divided by the plain per-token generation time.

    python benchmarks/bench_monitor.py                       # default model, CPU
    python benchmarks/bench_monitor.py --shape llama-1b --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from monitor.live import EmotionMonitor, Trace, _Watch
from monitor.rules import Threshold
from probes.bank import ProbeBank
from probes.corpus import emotions
from probes.architectures import text_config
from probes.models import DEFAULT_MODEL, fingerprint, load_model

PROMPTS = ["You must make these failing tests pass before the deadline tonight.",
           "Write a short note to a colleague about the quarterly report.",
           "My dog has been missing for three days and I cannot sleep.",
           "Explain how a hash map works.",
           "I just got the job I wanted for years!",
           "The server is down and customers are calling every minute.",
           "Describe a quiet morning at the lake.",
           "We have two months of runway left and no new investors."]
# Random-weight shapes for accelerator runs (timing only: weights do not matter).
SHAPES = {"llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000),
          "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000)}


def synthetic_bank(fp: dict, layer: int, seed: int = 0) -> ProbeBank:
    """A bank of the right shape with random directions: the readout costs the same."""
    rng = np.random.default_rng(seed)
    labels, d, L = emotions(), fp["hidden_size"], fp["layers"]
    n = len(labels)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    t = {"vectors": unit(rng.normal(size=(n, d))), "directions": unit(rng.normal(size=(n, d))),
         "dim_mean": np.zeros(d), "dim_scale": np.ones(d), "probe_coef": rng.normal(size=(n, d)),
         "probe_intercept": np.zeros(n), "score_mean": np.zeros(n), "score_std": np.ones(n),
         "layer_vectors": unit(rng.normal(size=(L, n, d)))}
    return ProbeBank(labels, layer, fp, {k: np.asarray(v, np.float32) for k, v in t.items()})


def setup(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.shape:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        fp = {"name": args.shape, "architecture": "llama", "layers": cfg.num_hidden_layers,
              "hidden_size": cfg.hidden_size, "tokenizer_sha": "random"}
        rng = np.random.default_rng(0)
        ids = [rng.integers(10, cfg.vocab_size, size=16 + 4 * i).tolist() for i in range(len(PROMPTS))]
        model.generation_config.pad_token_id = 0
        return model, None, synthetic_bank(fp, 2 * cfg.num_hidden_layers // 3), ids
    model, tok = load_model(args.model, dtype=args.dtype)
    model.to(device)
    fp = fingerprint(model, tok)
    bank = ProbeBank.load(args.run, fp) if args.run else synthetic_bank(fp, 2 * fp["layers"] // 3)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, bank, [tok(p)["input_ids"] for p in PROMPTS]


def batch_inputs(ids, batch, device):
    rows = [ids[i % len(ids)] for i in range(batch)]
    width = max(map(len, rows))
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):  # left padding, as generate expects
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def isolated_step_seconds(mon: EmotionMonitor, rule, batch: int, device, dtype, steps: int = 2000) -> float:
    """The monitor's per-token work alone: head on the last position, rule step, bookkeeping."""
    trace = Trace(mon.labels, [rule])
    watch = _Watch(trace, [rule], [rule], None, [0])
    d = text_config(mon.model).hidden_size
    h = torch.randn(batch, 1, d, device=device, dtype=dtype)
    ids = torch.ones(batch, 8, dtype=torch.long, device=device)
    W, b = mon.head(device)
    for i in range(steps + 50):
        if i == 50:
            sync(device)
            t0 = time.perf_counter()
        trace._steps.append(torch.nn.functional.linear(h[:, -1].float(), W, b))
        watch(ids, None)
        if len(trace._steps) > 256:
            trace._steps.clear()
    sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--run", help="run directory with a bank (default: a random bank of the same shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape instead of --model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/monitor.json")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 avoids spin-waiting on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, tok, bank, ids = setup(args)
    device = next(model.parameters()).device
    mon = EmotionMonitor(model, bank, tok)
    rule = Threshold("desperate", ">", 1e4)  # checked every token; set out of reach so both arms generate alike
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def plain(enc):
        return model.generate(**enc, **kw)

    def monitored(enc):
        with mon.attach(stop_on=[rule]) as trace:
            out = model.generate(**enc, **kw)
        assert trace.stopped[0] is None
        return out

    results = []
    for batch in args.batch:
        enc = batch_inputs(ids, batch, device)
        for fn in (plain, monitored):  # warm up both paths
            fn(enc)
        times = {"plain": [], "monitored": []}
        cpu = {"plain": [], "monitored": []}  # this process's CPU time: less hurt by other jobs on a shared CPU
        for r in range(args.repeats):
            order = (plain, monitored) if r % 2 == 0 else (monitored, plain)
            for fn in order:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                fn(enc)
                sync(device)
                times[fn.__name__].append(time.perf_counter() - t0)
                cpu[fn.__name__].append(time.process_time() - c0)
        ratios = [m / p for m, p in zip(times["monitored"], times["plain"])]
        cpu_ratios = [m / p for m, p in zip(cpu["monitored"], cpu["plain"])]
        step = isolated_step_seconds(mon, rule, batch, device, next(model.parameters()).dtype)
        per_token = statistics.median(times["plain"]) / args.new_tokens
        q = np.quantile(ratios, [0.25, 0.75])
        results.append({
            "batch": batch, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "plain_s": statistics.median(times["plain"]), "monitored_s": statistics.median(times["monitored"]),
            "ratio_median_of_pairs": statistics.median(ratios), "ratio_iqr": [float(q[0]), float(q[1])],
            "ratio_of_medians": statistics.median(times["monitored"]) / statistics.median(times["plain"]),
            "cpu_ratio_median_of_pairs": statistics.median(cpu_ratios),
            "cpu_ratio_of_medians": statistics.median(cpu["monitored"]) / statistics.median(cpu["plain"]),
            "isolated_monitor_us_per_token": step * 1e6, "plain_ms_per_token": per_token * 1e3,
            "isolated_overhead": step / per_token,
            "times": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
            "cpu_times": {k: [round(v, 4) for v in vs] for k, vs in cpu.items()}})
        print(json.dumps({k: v for k, v in results[-1].items() if not k.endswith("times")}))

    doc = {"benchmark": "monitor overhead (readout hook + one rule per token)",
           "model": args.shape or args.model, "shape": args.shape is not None, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "bank": "random (same shape)" if not args.run else args.run, "labels": len(bank.labels),
           "read_layer": bank.layer, "rule": str(rule), "goal": "ratio < 1.01", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

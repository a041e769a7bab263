"""Ray engine of the scan against the local scan, in one run on the same conversations:

- local: ``monitor.logscan.scan.scan`` in this process (torch, all the machine's threads);
- ray xN: ``scan_on_ray`` on a local Ray cluster with N actors, each with its share of
  the cores as torch threads; the wall time includes starting the actors and loading the
  model in each (the cluster itself is started once, before, and timed apart).

Per-actor throughput is tokens over the seconds the actors spent in ``scan_batch``
(``this_run.tokens_per_actor_s``), the figure a projection per node starts from. Also
checks that the Ray lines equal the local ones. The conversations are made here from the
sample transcripts' messages (seeded), not committed. Writes JSON.

    python benchmarks/bench_ray_scan.py --run runs/default --conversations 16 --out benchmarks/results/ray_scan.json
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

from monitor.logscan.readers import Conversation, read_logs
from monitor.logscan.scan import make_rules, scan

SAMPLES = Path(__file__).resolve().parents[1] / "monitor" / "samples"


def write_logs(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` conversations of 4-16 messages drawn from the sample transcripts, in order of
    role but shuffled in content: lengths vary as real logs do."""
    msgs = [m for c in read_logs([SAMPLES / "agent_frantic.jsonl", SAMPLES / "agent_calm.jsonl"])
            if isinstance(c, Conversation) for m in c.messages if m["role"] != "system"]
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for k in range(n):
            picked = [msgs[i] for i in rng.choice(len(msgs), int(rng.integers(4, 17)))]
            f.write(json.dumps({"id": f"c{k}", "messages": [{"role": m["role"], "content": m["content"]} for m in picked]}) + "\n")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def compare(a, b, out: dict) -> None:
    """Counts values that differ (out["differ"]), the largest numeric difference
    (out["max_abs_diff"]) and anything else that differs (out["other"])."""
    if isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b):
        for k in a:
            compare(a[k], b[k], out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for x, y in zip(a, b):
            compare(x, y, out)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        out["values"] += 1
        if a != b:
            out["differ"] += 1
            out["max_abs_diff"] = max(out["max_abs_diff"], abs(a - b))
    else:
        out["values"] += 1
        out["other"] += a != b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--model", help="model name or directory (default: the bank's)")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2, help="conversations per actor call")
    ap.add_argument("--out", default="benchmarks/results/ray_scan.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    with tempfile.TemporaryDirectory() as d:
        result = measure(Path(d), args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def measure(tmp: Path, args) -> dict:
    import ray
    import torch

    from monitor.logscan.ray_scan import scan_on_ray
    from monitor.runs import open_reader

    logs = write_logs(tmp / "logs.jsonl", args.conversations)
    cpus = os.cpu_count() or 1
    reader = open_reader(args.run, model=args.model)
    rules = make_rules(reader.bank)
    ways = {}
    t0 = time.perf_counter()
    s = scan([logs], tmp / "local.jsonl", reader, rules=rules, progress=False)
    ways["local"] = {"seconds": round(time.perf_counter() - t0, 2), "tokens": s["this_run"]["tokens"],
                     "torch_threads": torch.get_num_threads(), "input_bytes": logs.stat().st_size,
                     "output_bytes": (tmp / "local.jsonl").stat().st_size}
    del reader
    ref = lines(tmp / "local.jsonl")

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    for n in (1, 2):
        t0 = time.perf_counter()
        s = scan_on_ray([logs], args.run, tmp / f"ray{n}", model=args.model, rules=rules, actors=n,
                        shard_size=max(1, args.conversations // 4), batch_size=args.batch_size, progress=False)
        got = lines(tmp / f"ray{n}" / "scan.jsonl")
        r = s["this_run"]
        ways[f"ray_x{n}"] = {"seconds": round(time.perf_counter() - t0, 2), "tokens": r["tokens"],
                             "threads_per_actor": max(1, cpus // n), "actor_seconds": r["actor_seconds"],
                             "tokens_per_actor_s": r["tokens_per_actor_s"],
                             "actor_rss_mb": r["actor_rss_mb"], "lines": len(ref),
                             "lines_identical": sum(a == b for a, b in zip(got, ref)) if len(got) == len(ref) else 0,
                             "max_abs_diff_in_scores": max(abs(a["scores"][e] - b["scores"][e]) for a, b in zip(got, ref)
                                                           if a["scores"] for e in a["scores"])}
        diff = {"values": 0, "differ": 0, "max_abs_diff": 0.0, "other": 0}
        compare(got, ref, diff)
        ways[f"ray_x{n}"]["all_values_vs_local"] = diff
    ray.shutdown()
    base = ways["local"]["tokens"] / ways["local"]["seconds"]
    for w in ways.values():
        w["tokens_per_s"] = round(w["tokens"] / w["seconds"], 1)
        w["speed_vs_local"] = round(w["tokens_per_s"] / base, 2)
    return {"model": s["settings"]["model"], "layer": s["settings"]["layer"], "run": args.run,
            "conversations": args.conversations, "batch_size": args.batch_size, "ray": ray.__version__,
            "ray_cluster_start_seconds": round(ray_start, 1), "cpus": cpus, "machine": platform.platform(),
            "note": "one run on a shared 2-core box (other jobs running): ratios, not absolute speeds; "
                    "Ray wall times include starting the actors and loading the model in each",
            "ways": ways}


if __name__ == "__main__":
    main()

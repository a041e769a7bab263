"""Does a scan's memory stay flat as the logs grow? Peak RSS of (a) the log readers alone
and (b) a whole ``scan`` with the tiny test model (tests/conftest.py), on synthetic logs
of 1x, 10x and 100x a base of 1,000 conversations, each measured in a fresh process.
The logs are generated here (a JSONL file and an Inspect ``.eval`` archive per size),
never committed. Writes JSON with the ratios to the 1x run.

    python benchmarks/bench_scan_memory.py --out benchmarks/results/scan_memory.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL_OUTPUT = "FAILED tests/test_io.py::test_roundtrip - AssertionError: expected 3 rows, got 2\n"


def conversation(k: int) -> list[dict]:
    """An agent episode of 6 messages, about 1.4 kB, different per k."""
    return [{"role": "system", "content": "You are a coding agent. Keep the tests green."},
            {"role": "user", "content": f"Ticket {k}: the importer drops the last row of file {k % 97}.csv. Fix it."},
            {"role": "assistant", "content": f"I will run the tests first and read importer.py around line {k % 400}."},
            {"role": "tool", "content": TOOL_OUTPUT * (1 + k % 8)},
            {"role": "assistant", "content": "The loop stops one row early; I changed range(n - 1) to range(n)."},
            {"role": "user", "content": "Deploy is in ten minutes, are you sure?" if k % 3 else "Thanks, take your time."}]


def write_logs(directory: Path, n: int) -> dict[str, Path]:
    jsonl, archive = directory / f"log{n}.jsonl", directory / f"log{n}.eval"
    with open(jsonl, "w") as f:
        for k in range(n):
            f.write(json.dumps({"id": f"c{k}", "messages": conversation(k)}) + "\n")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("header.json", json.dumps({"version": 2, "status": "success"}))
        for k in range(n):
            zf.writestr(f"samples/{k}_epoch_1.json", json.dumps({"id": k, "epoch": 1, "messages": conversation(k)}))
    return {"jsonl": jsonl, "eval": archive}


# -- what each child process does -------------------------------------------------------
def child_readers(path: str) -> dict:
    from monitor.logscan.readers import Conversation, read_logs

    n = sum(isinstance(c, Conversation) for c in read_logs([path]))
    return {"conversations": n}


def child_scan(path: str, out: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import make_model, make_tokenizer, random_bank

    from monitor.logscan.scan import scan
    from probes.reader import TorchReader

    torch.set_num_threads(1)
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    reader = TorchReader(model, tok, random_bank(model, tok))
    s = scan([path], out, reader, progress=False, detail=False, overwrite=True)
    return {"conversations": s["conversations"], "tokens": s["tokens"]}


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss keeps the forking parent's size across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(args: list[str]) -> dict:
    """Run one child and return its result with its peak RSS (MiB) and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, *rest = sys.argv[2:]
        result = child_readers(*rest) if what == "readers" else child_scan(*rest)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=int, default=1000, help="conversations at 1x")
    ap.add_argument("--scales", default="1,10,100")
    ap.add_argument("--scan-scales", default="1,10,100", help="scales the (slower) scan is measured at")
    ap.add_argument("--out", default="benchmarks/results/scan_memory.json")
    args = ap.parse_args()
    scales = [int(x) for x in args.scales.split(",")]
    scan_scales = [int(x) for x in args.scan_scales.split(",")]
    result = {"base_conversations": args.base, "machine": platform.platform(), "python": platform.python_version(),
              "note": "peak RSS (VmHWM) of a fresh process per row: imports and the model count in every row, so "
                      "flat means the ratio to 1x stays near 1", "runs": []}
    with tempfile.TemporaryDirectory() as d:
        for scale in scales:
            n = args.base * scale
            logs = write_logs(Path(d), n)
            sizes = {k: round(p.stat().st_size / 2**20, 1) for k, p in logs.items()}
            for fmt, path in logs.items():
                row = {"what": f"readers ({fmt})", "scale": scale, "input_mib": sizes[fmt], **measure(["readers", str(path)])}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
            if scale in scan_scales:
                row = {"what": "scan (jsonl, tiny model)", "scale": scale, "input_mib": sizes["jsonl"],
                       **measure(["scan", str(logs["jsonl"]), str(Path(d) / "out.jsonl")])}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
            for p in logs.values():
                p.unlink()
    for row in result["runs"]:
        first = next(r for r in result["runs"] if r["what"] == row["what"])
        row["rss_ratio_vs_1x"] = round(row["peak_rss_mib"] / first["peak_rss_mib"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Banks for every offline model from corpus v2, each built in its own process (so its
peak RSS is its own), then one table: read layer, readers, baselines, evaluation sets,
geometry, build time, peak RSS.

    python benchmarks/build_banks.py [--only MODEL ...]   -> runs/<model>/ and benchmarks/results/banks.json
    (the default model's row is read from runs/default, which `make demo` builds)

Subsets (stories and messages per emotion; neutral dialogues and the evaluation sets
always whole) keep the larger models within a 2-core budget; reads use bfloat16 weights
(``emoprobe build --dtype bfloat16``), which matched float32 within 0.01 held-out top-1
on the pilot at every layer tried.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = {  # model -> stories (and messages) per emotion, or "full"
    "smollm2-135m-instruct": "full",
    "qwen2.5-coder-0.5b-instruct": "full",
    "gemma3-270m": "12",
    "qwen2.5-coder-1.5b-instruct": "4",
}


def run_dir(model: str) -> Path:
    """The default model's bank is the one `make demo` builds (calibrated and exported)."""
    return ROOT / "runs" / ("default" if model == "smollm2-135m-instruct" else model)


def build(model: str, subset: str) -> dict:
    out = run_dir(model)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "monitor.cli", "build", "--out", str(out), "--model", model, "--subset", subset,
           "--dtype", "bfloat16", "--skip", "calibrate", "--skip", "export"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((out / "report" / "validation.json").read_text())
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def row(model: str, r: dict) -> dict:
    pick = lambda m: {k: round(m[k], 4) for k in ("top1", "top5", "family_top1", "mean_rank", "headline_top1") if k in m}  # noqa: E731
    return {"model": model, "subset": r["corpus"]["subset"], "stories": r["corpus"]["stories"],
            "layer": r["layer"], "layers": r["model"]["layers"], "readout": r["readout"],
            "heldout": {k: pick(m) for k, m in r["readers"].items()},
            "baselines": {k: pick(m) for k, m in r["baselines"].items()}, "chance": pick(r["chance"]),
            "evaluation": {name: {k: pick(m) for k, m in ev.items() if isinstance(m, dict)}
                           for name, ev in r["evaluation"].items()},
            "short_text_best_start": r["short_texts"]["best_start"],
            "pc1_valence_r": r["pca"]["pc1_valence_r"], "pc2_arousal_r": r["pca"]["pc2_arousal_r"],
            "tylenol_rho": {e: round(r["tylenol"][e]["spearman"], 3) for e in ("afraid", "calm")},
            "build_s": r.get("wall_s", r["timing_s"]["total"]), "read_s": r["timing_s"]["read_activations"],
            "peak_rss_mb": r["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="models to (re)build; the others are read from runs/")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "banks.json"))
    args = ap.parse_args()
    rows = []
    for model, subset in PLAN.items():
        path = run_dir(model) / "report" / "validation.json"
        if args.only is None or model in args.only:
            rows.append(row(model, build(model, subset)))
        elif path.exists():
            rows.append(row(model, json.loads(path.read_text())))
    Path(args.out).write_text(json.dumps({"dtype": "bfloat16 reads", "banks": rows}, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

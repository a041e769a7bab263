"""Issue 11's per-model table, drawn only from each run's calibration JSON:
passes with controls (and on the danger effect alone), pair accuracy with its sign test,
contamination, held-out risk AUROC with its CI, and the read position chosen.

    python benchmarks/calibration_table.py runs/default runs/gemma3-270m ...
writes benchmarks/results/calibration.json and prints the README's markdown table."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "calibration.json"


def row(run: Path) -> dict:
    d = run / "calibration"
    summary = json.loads((d / "calibration.json").read_text())
    fams, pairs = {}, None
    for name, s in summary["suites"].items():
        doc = json.loads((d / s["file"]).read_text())
        if doc["kind"] == "pairs":
            pairs = doc
        else:
            fams.update({f"{name}/{k}": v for k, v in doc["families"].items()})
    ratios = [c["ratio"] for f in fams.values() for c in f["checks"].values() if c.get("ratio") is not None]
    side = {s: [f for f in fams.values() if f["side"] == s] for s in ("select", "report")}
    r, pos = summary["risk"], summary["positions"]
    pr = pairs["results"]
    return {
        "run": str(run), "model": summary["model"]["name"], "layer": summary["layer"], "at": summary["at"],
        "read_dtype": summary.get("read_dtype"), "position_auroc": pos["bank"]["auroc"], "position_rule": pos["bank"]["rule"],
        "layer_note": pos["layer_note"],
        "families": len(fams), "pass": sum(f["pass"] for f in fams.values()),
        "pass_without_control": sum(f["pass_without_control"] for f in fams.values()),
        "pass_report": sum(f["pass"] for f in side["report"]), "report_families": len(side["report"]),
        "passing": sorted(k for k, f in fams.items() if f["pass"]),
        "contamination_median": float(np.median(ratios)), "contamination_iqr": [float(np.quantile(ratios, .25)),
                                                                                float(np.quantile(ratios, .75))],
        "pairs": {k: pr[k]["combined"] for k in ("all", "select", "report")},
        "pairs_afraid": pr["all"]["afraid"], "pairs_calm": pr["all"]["calm"],
        "pairs_by_domain": {k[7:]: v["combined"]["accuracy"] for k, v in pr.items() if k.startswith("domain:")},
        "risk": None if r is None else {k: r[k] for k in ("score", "calibrator", "usable", "usable_reason")}
        | {k: r["heldout"][k] for k in ("auroc", "auroc_ci95", "brier", "ece", "auroc_families_only", "auroc_pairs_only")},
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| model | read at (layer) | families pass with controls / without | contamination median (IQR) | "
             "pairs right, report side (p) | pairs right, all 50 (p) | risk AUROC held out [95% CI] | on the pairs alone | "
             "Brier / ECE | usable |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        r, p = x["risk"], x["pairs"]
        lines.append(
            f"| {x['model']} | {x['at']} ({x['layer']}) | {x['pass']}/{x['families']} / {x['pass_without_control']}/{x['families']}"
            f" | {x['contamination_median']:.2f} ({x['contamination_iqr'][0]:.2f}-{x['contamination_iqr'][1]:.2f})"
            f" | {p['report']['right']}/{p['report']['pairs']} ({p['report']['sign_test_p']:.2g})"
            f" | {p['all']['right']}/{p['all']['pairs']} ({p['all']['sign_test_p']:.2g})"
            f" | {r['auroc']:.2f} [{r['auroc_ci95'][0]:.2f}, {r['auroc_ci95'][1]:.2f}] | {r['auroc_pairs_only']:.2f}"
            f" | {r['brier']:.3f} / {r['ece']:.3f}"
            f" | {'yes' if r['usable'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = [row(Path(a)) for a in sys.argv[1:]]
    OUT.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))

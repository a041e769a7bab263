"""emoprobe calibrate: scenario suites -> curves, z-score baseline, alert thresholds, risk."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a bank against scenario suites with a controlled danger level")
    p.add_argument("--run", required=True, help="run directory with bank/")
    p.add_argument("--suite", action="append", default=None,
                   help="suite JSON file (repeatable; 'builtin' adds the shipped suites); default: the shipped suites")
    p.add_argument("--out", help="also write all results as one JSON file here")
    p.add_argument("--at", default="reply", choices=["reply", "user"],
                   help="read at the token opening the assistant's reply (paper) or at the user's last token")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the alert thresholds on the neutral set")
    p.add_argument("--no-save", action="store_true", help="write the results but leave the bank unchanged")
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=run)


def run(args) -> int:
    from calibration import calibrate_run, resolve_suites
    from monitor.runs import open_run

    suites = resolve_suites(args.suite)  # validate before loading anything heavy
    bank, model, tok = open_run(args.run, args.model, args.device)
    bank = calibrate_run(args.run, model, tok, bank, suites=suites, out=args.out, at=args.at, fpr=args.fpr,
                         batch_size=args.batch_size, save=not args.no_save)
    print(summary_table(args.run))
    return 0


def summary_table(run_dir) -> str:
    """Per family: rho of the expected emotions and pass/fail; then the risk metrics.
    Drawn from runs/NAME/calibration/*.json only."""
    import json
    from pathlib import Path

    d = Path(run_dir) / "calibration"
    summary = json.loads((d / "calibration.json").read_text())
    lines = [f"{'family':<32} {'pass':<5} rho of expected emotions"]
    for name, s in summary["suites"].items():
        doc = json.loads((d / s["file"]).read_text())
        for fam, r in doc["families"].items():
            rhos = "  ".join(f"{e} {c['rho']:+.2f}" for e, c in r["checks"].items())
            lines.append(f"{name + '/' + fam:<32} {'yes' if r['pass'] else 'NO':<5} {rhos}")
    passed = sum(s["passed"] for s in summary["suites"].values())
    total = sum(s["total"] for s in summary["suites"].values())
    lines.append(f"\n{passed}/{total} families pass")
    b = summary["baseline"]
    lines.append(f"baseline: {b['tokens']} tokens of ordinary text ({b['prompts']} prompts, {b['chats']} chats); "
                 f"alert thresholds at FPR {summary['thresholds']['fpr']:g}")
    r = summary["risk"]
    if r is None:
        lines.append("risk: not fitted (needs at least 3 families with danger_from)")
    else:
        lo = r["lofo"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"risk ({r['score']} + {r['calibrator']}), leave-one-family-out over {r['families']} families: "
                     f"AUROC {fmt(lo['auroc'])}  Brier {fmt(lo['brier'])}  ECE {fmt(lo['ece'])}"
                     + ("" if r.get("usable", True) else "  (not usable: held-out AUROC < 0.6)"))
    lines.append(f"results: {d}/ (JSON per suite, calibration.json, PNG plots)")
    return "\n".join(lines)

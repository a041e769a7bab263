"""emoprobe calibrate: scenario suites -> read positions, curves with controls,
fixed-number pairs, z-score baseline, alert thresholds, risk."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate a bank against scenario suites with a controlled danger level")
    p.add_argument("--run", required=True, help="run directory with bank/")
    p.add_argument("--suite", action="append", default=None,
                   help="suite JSON file, families or pairs (repeatable; 'builtin' adds the shipped suites); "
                        "default: the shipped suites")
    p.add_argument("--out", help="also write all results as one JSON file here")
    p.add_argument("--at", default="auto",
                   help="read position: auto (chosen on the select side of calibration/split.json), reply (the "
                        "paper's reply-opening token), user (user's last token), user_mean, or reply-K")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the alert thresholds on the neutral set")
    p.add_argument("--no-save", action="store_true", help="write the results but leave the bank unchanged")
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"],
                   help="weights for reading (bfloat16: ~3x faster on CPUs with bf16 units; auto: bfloat16 where "
                        "the device runs it natively)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=run)


def run(args) -> int:
    from calibration import calibrate_run, resolve_suites
    from calibration.positions import check_at
    from monitor.runs import open_run

    check_at(args.at)
    suites = resolve_suites(args.suite)  # validate before loading anything heavy
    bank, model, tok = open_run(args.run, args.model, args.device, args.dtype)
    bank = calibrate_run(args.run, model, tok, bank, suites=suites, out=args.out, at=args.at, fpr=args.fpr,
                         batch_size=args.batch_size, save=not args.no_save)
    print(summary_table(args.run))
    return 0


def _f(v) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def summary_table(run_dir) -> str:
    """Per family: rho(danger), rho(control) and pass/fail per expected emotion; per pair
    suite: accuracy and sign test; the position chosen; the risk and why it is (not)
    usable, in one line. Drawn from runs/NAME/calibration/*.json only."""
    import json
    from pathlib import Path

    d = Path(run_dir) / "calibration"
    summary = json.loads((d / "calibration.json").read_text())
    lines = [f"read at {summary['at']!r}" + (f" ({summary['positions']['bank']['rule']})" if "positions" in summary else ""),
             f"{'family':<32} {'side':<7} {'pass':<5} expected emotion: rho(danger) / rho(control)"]
    passed = without = total = 0
    pair_lines = []
    for name, s in summary["suites"].items():
        doc = json.loads((d / s["file"]).read_text())
        if doc.get("kind", "families") == "pairs":
            for side in ("all", "select", "report"):
                r = doc["results"].get(side, {}).get("combined")
                if r:
                    pair_lines.append(f"pairs {name} ({side}): {r['right']}/{r['pairs']} move the expected way "
                                      f"({doc['combined']}), sign test p={r['sign_test_p']:.3g}")
            continue
        passed, without, total = passed + doc["passed"], without + doc["passed_without_control"], total + doc["total"]
        for fam, r in doc["families"].items():
            rhos = "  ".join(f"{e} {_f(c['rho'])}/{_f(c.get('rho_control'))}" for e, c in r["checks"].items())
            lines.append(f"{name + '/' + fam:<32} {r.get('side', ''):<7} {'yes' if r['pass'] else 'NO':<5} {rhos}")
    lines.append(f"\n{passed}/{total} families pass with controls ({without}/{total} on the danger effect alone)")
    lines += pair_lines
    b = summary["baseline"]
    lines.append(f"baseline: {b['tokens']} tokens of ordinary text ({b['prompts']} prompts, {b['chats']} chats); "
                 f"alert thresholds at FPR {summary['thresholds']['fpr']:g}")
    r = summary["risk"]
    if r is None:
        lines.append("risk: not fitted (needs at least 3 labelled groups on the select side)")
    else:
        h = r["heldout"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"risk ({r['score']} + {r['calibrator']}): Brier {fmt(h['brier'])}  ECE {fmt(h['ece'])}")
        lines.append(f"risk {r['usable_reason']}")
    lines.append(f"results: {d}/ (JSON per suite, calibration.json, PNG plots incl. positions.png)")
    return "\n".join(lines)

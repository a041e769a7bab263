"""emoprobe export: the run's bank (and the model up to its read layer) -> RUN/export/."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export the bank to ONNX (head, fused monitor, int8) and llama.cpp vectors")
    p.add_argument("--run", required=True, help="run directory with bank/; writes RUN/export/")
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--device", help="torch device for the parity checks (default: cuda when present, else cpu)")
    p.add_argument("--no-int8", action="store_true", help="skip the quantised monitor.int8.onnx")
    p.add_argument("--no-steering", action="store_true", help="skip the llama.cpp control vectors")
    p.set_defaults(func=run)


def run(args) -> int:
    from exporters import export_run
    from monitor.runs import open_run

    bank, model, tok = open_run(args.run, args.model, args.device)
    out = export_run(args.run, model, tok, bank, int8=not args.no_int8, steering=not args.no_steering)
    print(summary_table(out))
    return 0


def summary_table(export_dir) -> str:
    """Files, parity and int8 fidelity, drawn from card.json only."""
    card = json.loads((Path(export_dir) / "card.json").read_text())
    lines = [f"{'file':<20} {'MB':>8}"]
    lines += [f"{name:<20} {f['bytes'] / 1e6:>8.1f}" for name, f in card["files"].items()]
    c = card["checks"]
    p = c["fp32_vs_torch"]
    lines.append(f"\nfp32 vs torch on {c['texts']} texts ({p['tokens']} tokens): max |diff| {p['max_abs_diff']:.2e}")
    if "int8_vs_fp32" in c:
        for q in c["int8_vs_fp32"]["candidates"]:
            mark = "*" if q["scheme"] == card["int8_scheme"] else " "
            lines.append(f"{mark} int8 {q['scheme']:<24} Spearman mean {q['spearman_mean']:.4f} "
                         f"(min {q['spearman_min']:.3f}), same top-3 on {q['top3_agreement']:.0%} of tokens")
    if "steering" in card:
        s = card["steering"]
        lines.append(f"\nllama.cpp control vectors: {len(s['files'])} in {s['directory']}/ "
                     f"(layers {s['layers']}; {s['unit']})")
    lines.append(f"\nexport directory: {export_dir}  (card.json has every number above)")
    return "\n".join(lines)

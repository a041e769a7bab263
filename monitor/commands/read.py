"""emoprobe read: top emotions per token of a text, or pooled scores for a JSONL file."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("read", help="read emotions from text")
    p.add_argument("--run", required=True, help="run directory with bank/ (and export/ for --backend onnx)")
    p.add_argument("text", nargs="?", help="text to read (omit with --jsonl)")
    p.add_argument("--chat", action="store_true",
                   help="treat the text as a user turn and also read the token that opens the assistant's reply")
    p.add_argument("--jsonl", help='input JSONL, one {"id": ..., "text": ...} per line')
    p.add_argument("--out", help="output JSONL for --jsonl (default: stdout)")
    p.add_argument("--pool", default="mean", choices=["mean", "last", "max"], help="pooling over tokens for --jsonl")
    p.add_argument("--top", type=int, default=3, help="emotions shown per token")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--json", help="also write the per-token table as JSON here")
    p.set_defaults(func=run)


def make_reader(run_dir: str, backend: str = "torch", model_name: str | None = None):
    """A reader for a run directory; the onnx backend never imports torch."""
    if backend == "onnx":
        from exporters import load

        return load(Path(run_dir))
    from probes.bank import ProbeBank
    from probes.models import fingerprint, load_model
    from probes.reader import TorchReader

    bank = ProbeBank.load(run_dir)
    model, tok = load_model(model_name or bank.model["name"])
    bank = ProbeBank.load(run_dir, fingerprint(model, tok))
    return TorchReader(model, tok, bank)


def _top(labels, scores, k):
    order = scores.argsort()[::-1][:k]
    return [(labels[i], float(scores[i])) for i in order]


def run(args) -> int:
    if bool(args.text) == bool(args.jsonl):
        raise ValueError("give either a text or --jsonl FILE")
    if args.jsonl and not Path(args.jsonl).is_file():  # before loading a model for nothing
        raise FileNotFoundError(f"{args.jsonl}: no such file")
    reader = make_reader(args.run, args.backend, args.model)
    if args.jsonl:
        return _read_jsonl(reader, args)
    (tokens, scores), = reader.read_tokens([args.text])
    rows = [{"index": i, "token": t, "top": _top(reader.labels, s, args.top)} for i, (t, s) in enumerate(zip(tokens, scores))]
    z = "z" if reader.bank.calibrated else "score"
    for r in rows:
        tops = "  ".join(f"{e} {v:+.2f}" for e, v in r["top"])
        print(f"{r['index']:>4} {r['token']!r:<18} {tops}")
    doc = {"text": args.text, "unit": z, "tokens": rows}
    if args.chat:
        reply = reader.read_chat([args.text], at="reply")[0]
        doc["reply_token"] = _top(reader.labels, reply, max(args.top, 5))
        print("\nat the token that opens the assistant's reply:")
        print("  " + "  ".join(f"{e} {v:+.2f}" for e, v in doc["reply_token"]))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


def _read_jsonl(reader, args) -> int:
    from probes.corpus import read_jsonl

    records = list(read_jsonl(Path(args.jsonl)))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for start in range(0, len(records), 32):
            chunk = records[start:start + 32]
            scores = reader.read([str(r["text"]) for r in chunk], pool=args.pool)
            for r, s in zip(chunk, scores):
                out.write(json.dumps({"id": r["id"], "scores": dict(zip(reader.labels, map(float, s.round(4))))}) + "\n")
            out.flush()
    finally:
        if args.out:
            out.close()
    return 0

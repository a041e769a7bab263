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
    p.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")
    p.add_argument("--json", help="also write the per-token table as JSON here")
    p.set_defaults(func=run)


def _top(labels, scores, k):
    order = scores.argsort()[::-1][:k]
    return [(labels[i], float(scores[i])) for i in order]


def run(args) -> int:
    if bool(args.text) == bool(args.jsonl):
        raise ValueError("give either a text or --jsonl FILE")
    from monitor.runs import open_reader
    from probes.corpus import read_jsonl

    records = list(read_jsonl(Path(args.jsonl))) if args.jsonl else None  # a bad file fails before the model loads
    reader = open_reader(args.run, args.backend, args.model, args.device)
    if records is not None:
        return _read_jsonl(reader, records, args)
    from probes.tokens import encode_chat

    tok = reader.tokenizer
    if args.chat:  # one pass over the chat: the user's tokens and the reply-opening token
        _, ids, _, members = encode_chat(tok, [{"role": "user", "content": args.text}], generation_prompt=True)
        shown = list(members[0])
    else:
        ids = reader.encode([args.text])[0]
        shown = list(range(1, len(ids))) or [0]  # token 0 is the attention sink: tens of z, never pooled
    scores = reader.score_ids([ids])[0]
    rows = [{"index": i, "token": tok.decode([ids[i]]), "top": _top(reader.labels, scores[i], args.top)} for i in shown]
    z = "z" if reader.bank.calibrated else "score"
    if not args.chat and len(ids) > 1:
        print(f"     (token 0, {tok.decode([ids[0]])!r}, is the model's attention sink: not shown)")
    for r in rows:
        tops = "  ".join(f"{e} {v:+.2f}" for e, v in r["top"])
        print(f"{r['index']:>4} {r['token']!r:<18} {tops}")
    doc = {"text": args.text, "unit": z, "tokens": rows}
    if args.chat:
        doc["reply_token"] = _top(reader.labels, scores[-1], max(args.top, 5))
        doc["user_turn_mean"] = _top(reader.labels, scores[shown].mean(0), max(args.top, 5))
        print("\nat the token that opens the assistant's reply (the paper's position):")
        print("  " + "  ".join(f"{e} {v:+.2f}" for e, v in doc["reply_token"]))
        print("averaged over the user's turn:")
        print("  " + "  ".join(f"{e} {v:+.2f}" for e, v in doc["user_turn_mean"]))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


def _read_jsonl(reader, records: list[dict], args) -> int:
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

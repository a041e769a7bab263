"""emoprobe corpus: (re)write the story corpus for any model, resumably."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("corpus", help="write emotion stories and neutral dialogues with a model")
    p.add_argument("--out", required=True, help="corpus file to write (.jsonl.gz); raw generations go beside it")
    p.add_argument("--writer", default="smollm2-135m-instruct", help="model that writes the stories")
    p.add_argument("--stories", type=int, default=20, help="stories per emotion")
    p.add_argument("--neutral", type=int, default=2, help="neutral dialogues per topic")
    p.add_argument("--emotions", help="comma-separated subset of emotions (default: all 171)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from probes import corpus
    from probes.models import load_model

    out = Path(args.out)
    if not out.name.endswith(".jsonl.gz"):
        raise ValueError("--out must end in .jsonl.gz")
    emotion_list = None
    if args.emotions:
        emotion_list = [e.strip() for e in args.emotions.split(",")]
        unknown = sorted(set(emotion_list) - set(corpus.emotions()))
        if unknown:
            raise ValueError(f"unknown emotions: {unknown}")
    raw = out.with_name(out.name.replace(".jsonl.gz", ".raw.jsonl"))
    model, tok = load_model(args.writer)
    jobs = corpus.plan(args.stories, args.neutral, emotion_list)
    counts = corpus.generate(model, tok, jobs, raw, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, writer=args.writer)
    stats = {**corpus.finalize(raw, out), **counts, "writer": args.writer}
    out.with_name(out.name.replace(".jsonl.gz", ".stats.json")).write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))
    return 0

"""Causal check: does steering an emotion vector change what the model writes?

For several prompts and sampling seeds, generate unsteered and with "calm" up and
"desperate" up (same seed, so the arms differ only by the steering), then measure
1. the monitor's readout of the steered emotion during generation,
2. the generated text's emotional content, read back afterwards by the *unsteered*
   model with the bank (mean over the reply's tokens), and by an independent word-level
   valence lexicon (monitor/data/valence_words.json: positive minus negative words per
   100 words).
Steered layers at or below the read layer shift its readout directly; above it, only
through the tokens the steering changed. Effect sizes are against the unsteered arm: mean difference, Cohen's d (pooled SD)
and paired d (same prompt and seed). Writes JSON.

    python benchmarks/causal_steering.py --run runs/default --out benchmarks/results/causal_steering.json
"""
from __future__ import annotations

import argparse
import json
import re
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from monitor.live import EmotionMonitor
from probes.bank import ProbeBank
from probes.tokens import chat_prompt
from probes.models import fingerprint, load_model
from probes.reader import TorchReader

PROMPTS = ["Tell me about your day.",
           "Write a few sentences about a walk in the park.",
           "Describe what you see out of the window right now.",
           "Write a short message to a friend you have not seen in a while.",
           "What is on your mind this evening?",
           "Tell me a short story about a train journey."]
ARMS = {"unsteered": {}, "calm+": {"calm": +1.0}, "desperate+": {"desperate": +1.0}}
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def lexicon() -> tuple[set[str], set[str]]:
    doc = json.loads(resources.files("monitor").joinpath("data/valence_words.json").read_text())
    return set(doc["positive"]), set(doc["negative"])


def lexicon_valence(text: str, words=None) -> float:
    """(positive - negative words) per 100 words; 0 for an empty text."""
    pos, neg = words or lexicon()
    tokens = WORD.findall(text.lower())
    return 100.0 * (sum(t in pos for t in tokens) - sum(t in neg for t in tokens)) / max(len(tokens), 1)


def effect(treated: np.ndarray, base: np.ndarray) -> dict:
    """Mean difference, Cohen's d with the pooled SD, and paired d (pairs share prompt and seed)."""
    diff = treated - base
    pooled = np.sqrt((treated.var(ddof=1) + base.var(ddof=1)) / 2)
    return {"mean_treated": float(treated.mean()), "mean_unsteered": float(base.mean()),
            "mean_diff": float(diff.mean()), "cohens_d": float(diff.mean() / pooled) if pooled > 0 else None,
            "paired_d": float(diff.mean() / diff.std(ddof=1)) if diff.std(ddof=1) > 0 else None,
            "share_of_pairs_up": float((diff > 0).mean()), "n": int(len(diff))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--model", help="default: the bank's model")
    ap.add_argument("--strength", type=float, default=0.1, help="fraction of the layer's mean residual norm")
    ap.add_argument("--layers", help="comma-separated layers to steer (default: every other layer from 1/3 to 1/2 of "
                    "the depth, the paper's middle layers)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--out", default="benchmarks/results/causal_steering.json")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 avoids spin-waiting on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    bank = ProbeBank.load(args.run)
    model, tok = load_model(args.model or bank.model["name"])
    mon = EmotionMonitor(model, ProbeBank.load(args.run, fingerprint(model, tok)), tok)
    reader = TorchReader(model, tok, mon.bank)
    n_layers = len(mon.residual_norms())
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(range(n_layers // 3, n_layers // 2, 2)))
    prompts = PROMPTS[: args.prompts]
    tok.padding_side = "left"
    enc = tok([chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    P = enc["input_ids"].shape[1]
    words = lexicon()
    idx = {e: mon.bank.index(e) for e in ("calm", "desperate")}

    rows = []
    for seed in range(args.seeds):
        for arm, direction in ARMS.items():
            torch.manual_seed(seed)
            with mon.steer({e: s * args.strength for e, s in direction.items()}, layers=layers), \
                    mon.attach() as trace:
                out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=True,
                                     temperature=args.temperature, pad_token_id=tok.pad_token_id)
            texts = [tok.decode(out[i, P:P + n], skip_special_tokens=True) for i, n in enumerate(trace.lengths)]
            read_back = reader.read([t if t.strip() else "." for t in texts], pool="mean")
            for i, text in enumerate(texts):
                live = trace.sequence(i).mean(0)
                rows.append({"seed": seed, "prompt": i, "arm": arm, "text": text,
                             **{f"live_{e}": float(live[j]) for e, j in idx.items()},
                             **{f"text_{e}": float(read_back[i, j]) for e, j in idx.items()},
                             "lexicon_valence": lexicon_valence(text, words)})
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def column(arm, key):
        return np.array([r[key] for r in sorted(rows, key=lambda r: (r["seed"], r["prompt"])) if r["arm"] == arm])

    effects = {}
    for arm, emotion, sign in (("calm+", "calm", +1), ("desperate+", "desperate", +1)):
        effects[arm] = {key: effect(column(arm, key), column("unsteered", key))
                        for key in (f"live_{emotion}", f"text_{emotion}", "lexicon_valence",
                                    "live_calm" if emotion == "desperate" else "live_desperate")}
        effects[arm]["expected"] = {f"live_{emotion}": "up", f"text_{emotion}": "up",
                                    "lexicon_valence": "up" if emotion == "calm" else "down"}
    doc = {"experiment": "causal steering check", "model": mon.bank.model["name"], "run": args.run,
           "read_layer": mon.layer, "steer_layers": layers,
           "readout_path": "direct" if min(layers) <= mon.layer else "through the generated tokens only", "strength": args.strength,
           "residual_norms": {k: round(float(mon.residual_norms()[k]), 3) for k in layers},
           "unit": "z" if mon.bank.calibrated else "score (z against neutral dialogues, uncalibrated)",
           "prompts": prompts, "seeds": args.seeds, "new_tokens": args.new_tokens, "temperature": args.temperature,
           "effects": effects, "seconds": round(time.perf_counter() - t0, 1), "samples": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({"effects": effects, "steer_layers": layers, "strength": args.strength}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""emoprobe watch: generate with a live per-token emotion readout, alerts and steering.

Tokens are printed as they come, colored by their leading emotion (green: positive,
yellow: neutral, red/magenta/blue: negative with high/medium/low arousal; bold at
z >= 2). In a terminal a status line pinned to the bottom row shows the top emotions
and the alerts so far; the text scrolls above it (a scroll region, as apt does).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path



def register(sub) -> None:
    p = sub.add_parser("watch", help="generate with a live emotion readout, alerts and steering")
    p.add_argument("--run", required=True, help="run directory with bank/")
    p.add_argument("prompt", help="user message (sent through the chat template unless --raw)")
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")
    p.add_argument("--steer", action="append", default=[], metavar="EMOTION=STRENGTH",
                   help="add STRENGTH x the layer's mean residual norm of EMOTION's vector (repeatable), e.g. desperate=+0.05")
    p.add_argument("--steer-layers", help="comma-separated layers to steer at (default: the read layer)")
    p.add_argument("--alert", action="append", default=[], metavar="RULE",
                   help="alert rule (repeatable), e.g. 'desperate>3', 'calm<-2 for 3', 'angry>2 rolling 5'")
    p.add_argument("--stop", action="store_true", help="stop generating when an alert fires")
    p.add_argument("--json", help="write the trace (tokens, top emotions, all scores, alerts) here")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=3, help="emotions shown in the status line and per token in --json")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=run)


def parse_steer(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        emotion, sep, value = item.rpartition("=")
        try:
            out[emotion.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not emotion.strip():
            raise ValueError(f"--steer expects EMOTION=STRENGTH (e.g. desperate=+0.05), got {item!r}")
    return out


def affect_colors(labels: list[str]) -> dict[str, str]:
    """ANSI color per emotion from the coarse valence/arousal ratings shipped with probes."""
    from probes.corpus import DATA

    ratings = json.loads(DATA.joinpath("affect.json").read_text())["ratings"]
    colors = {}
    for e in labels:
        r = ratings.get(e, {})
        v, a = r.get("valence", 0), r.get("arousal", 1)
        colors[e] = "32" if v > 0 else "33" if v == 0 else {2: "31", 1: "35"}.get(a, "34")
    return colors


class Screen:
    """Token text above a status line pinned to the bottom row (DECSTBM scroll region);
    without a terminal, plain text and no status line."""

    def __init__(self, out, tty: bool, color: bool):
        self.out, self.tty, self.color = out, tty, color
        self.rows, self.cols = 0, 80

    def open(self):
        if self.tty:
            self.cols, self.rows = shutil.get_terminal_size()
            # make room for the status row, then confine scrolling to the rows above it
            self.out.write(f"\n\0337\033[1;{self.rows - 1}r\0338\033[1A")
            self.out.flush()

    def text(self, piece: str, code: str | None = None, bold: bool = False):
        if self.color and code and piece:
            piece = f"\033[{'1;' if bold else ''}{code}m{piece}\033[0m"
        self.out.write(piece)
        self.out.flush()

    def status(self, line: str):
        if self.tty:
            self.out.write(f"\0337\033[{self.rows};1H\033[2K{line[: self.cols - 1]}\0338")
            self.out.flush()

    def close(self):
        if self.tty:
            self.out.write(f"\0337\033[r\0338\0337\033[{self.rows};1H\033[2K\0338")
        self.out.write("\n")
        self.out.flush()


def make_painter(tokenizer, trace, screen: Screen, colors: dict[str, str], top: int):
    """A transformers streamer that prints each new token in its leading emotion's color."""
    from transformers.generation.streamers import BaseStreamer

    class Painter(BaseStreamer):
        def __init__(self):
            self.ids, self.printed, self.seen_prompt, self.rows = [], "", False, []

        def put(self, value):
            if not self.seen_prompt:  # generate() hands the prompt over first
                self.seen_prompt = True
                return
            for token in value.flatten().tolist():
                t = len(self.ids)
                self.ids.append(token)
                scores = trace._steps[t][0].float().cpu().numpy()
                order = scores.argsort()[::-1][:top]
                lead = trace.labels[order[0]]
                text = tokenizer.decode(self.ids, skip_special_tokens=True)
                piece = ""
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    piece = text[len(self.printed):] if text.startswith(self.printed) else text[-1:]
                    self.printed = text
                screen.text(piece, colors.get(lead), bold=scores[order[0]] >= 2)
                self.rows.append({"index": t, "token": tokenizer.convert_ids_to_tokens(token),
                                  "top": [[trace.labels[j], round(float(scores[j]), 3)] for j in order]})
                tops = "  ".join(f"{trace.labels[j]} {scores[j]:+.2f}" for j in order)
                alerts = "  ".join(f"! {a.rule} @{a.token}" for a in trace.live_alerts[-3:])
                screen.status(f" {t + 1:>4} tok | {tops}" + (f" | {alerts}" if alerts else ""))

        def end(self):
            pass

    return Painter()


def run(args) -> int:
    import torch

    from monitor.runs import open_run
    from probes.bank import ProbeBank
    from probes.tokens import chat_prompt

    from ..live import EmotionMonitor
    from ..rules import parse_rule

    bank = ProbeBank.load(args.run)
    rules = [parse_rule(text, bank.labels) for text in args.alert]
    steer = parse_steer(args.steer)
    for emotion in steer:
        bank.index(emotion)
    layers = [int(x) for x in args.steer_layers.split(",")] if args.steer_layers else None
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")

    bank, model, tok = open_run(args.run, args.model, args.device)
    mon = EmotionMonitor(model, bank, tok)
    for rule in rules:
        mon.alert(rule)
    prompt = args.prompt if args.raw else chat_prompt(tok, args.prompt)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=args.raw).to(model.device)

    tty = sys.stdout.isatty()
    screen = Screen(sys.stdout, tty, args.color == "always" or (args.color == "auto" and tty))
    unit = "z" if mon.bank.calibrated else "score (uncalibrated)"
    print(f"[emoprobe] {mon.bank.model['name']}, read layer {mon.layer}, unit {unit}"
          + (f", steering {steer} at layers {layers or [mon.layer]}" if steer else "")
          + (f", alerts {[str(r) for r in rules]}" if rules else ""), file=sys.stderr, flush=True)

    def on_alert(alert):
        if not tty:
            print(f"[alert] {alert.rule} at token {alert.token} "
                  + ", ".join(f"{k}={v:+.2f}" for k, v in alert.values.items()), file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)
    screen.open()
    try:
        with mon.steer(steer, layers=layers), mon.attach(stop_on=rules if args.stop else (), on_alert=on_alert) as trace:
            painter = make_painter(tok, trace, screen, affect_colors(mon.labels), args.top)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, streamer=painter,
                                 pad_token_id=tok.pad_token_id, **sampling)
    finally:
        screen.close()

    scores = trace.sequence(0)
    mean = scores.mean(0) if len(scores) else scores.sum(0)
    strongest = [(mon.labels[j], float(mean[j])) for j in mean.argsort()[::-1][: args.top]]
    alerts = trace.alerts
    print(f"{len(scores)} tokens; strongest on average: " + ", ".join(f"{e} {v:+.2f}" for e, v in strongest))
    for a in alerts:
        print(f"alert: {a.rule} at tokens {a.token}-{a.end} ("
              + ", ".join(f"{k}={v:+.2f}" for k, v in a.values.items()) + ")")
    if trace.stopped[0] is not None:
        print(f"stopped at token {trace.stopped[0]} by an alert")
    if args.json:
        doc = {"prompt": args.prompt, "model": mon.bank.model, "run": str(args.run), "layer": mon.layer, "unit": unit,
               "steer": steer, "steer_layers": layers or ([mon.layer] if steer else []), "rules": [str(r) for r in rules],
               "text": tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True),
               "reply_token_top": [[e, round(float(v), 3)] for e, v in
                                   sorted(zip(mon.labels, trace.prompt_scores), key=lambda x: -x[1])[: args.top]],
               "tokens": painter.rows, "strongest": strongest, **trace.to_dict()}
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0

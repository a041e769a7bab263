"""Scan agent logs: per-message emotion scores, flags on risky states, resumable output.

Each conversation is rendered once with the model's chat template, tokenized once with
character offsets, read once by a reader (``TorchReader`` or the ONNX reader: anything
with ``score_ids``) in overlapping windows when longer than the reader's context, and its
token scores mapped back to the messages they came from. Conversations are read many
at a time, grouped by length so that padding stays cheap.

Output (``--out scan.jsonl``) is one line per message, appended one whole conversation at a
time and flushed, so a killed scan loses nothing: on restart the partial tail (if any) is
cut, finished conversations are skipped, and no line is ever written twice.

Memory stays flat in the input's size: logs are streamed (``readers``), conversations are
read a batch at a time, and the summary keeps running totals and the top conversations
only. What grows is one id hash per conversation (duplicates and resume: about 70 bytes
each in a Python set, 7 MB per 100,000 conversations).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from monitor.rules import AllOf, AnyOf, Rule, Threshold, parse_rule
from probes.tokens import encode_chat

from .readers import Conversation, Skipped, id_hash, read_logs

DEFAULT_WATCH = ("desperate", "panicked", "afraid", "hostile", "angry", "calm<")
DEFAULT_Z = 3.0  # alert threshold (z-score) when the bank carries no calibrated one
SMOOTH = 5  # watched emotions are read as a rolling mean over this many tokens: probes are local and noisy
TOP = 3  # emotions kept per token for the report's hover
FLAG_GAP = 2  # firing episodes this close (tokens) make one flag
CONTEXT = 4  # tokens of context either side of a flag's snippet
MAX_MESSAGE_TOKENS = 16384  # a message past this (a tool dumping a log) is read up to it, and the cut reported


# -- rules (the parser and semantics are monitor.rules', shared with `emoprobe watch`) --------
def calibrated_thresholds(bank) -> dict[str, float]:
    """Per-emotion alert thresholds (z, high side, 1% FPR on ordinary text) that
    calibration stores as a bank tensor; empty for an uncalibrated bank."""
    cal = (bank.meta or {}).get("calibration") or {}
    listed = (cal.get("alert") or {}).get("tensors") or {}  # name -> what it thresholds
    t = bank.tensors.get("alert_threshold") if "alert_threshold" in listed else None
    if t is None or len(t) != len(bank.labels):
        return {}
    return {e: float(v) for e, v in zip(bank.labels, t) if np.isfinite(v)}


def make_rules(bank, watch: Iterable[str] | None = None, alerts: Iterable[str] = (), smooth_tokens: int = SMOOTH) -> list[Rule]:
    """Rules for the watched emotions at the bank's calibrated thresholds (else
    +-DEFAULT_Z), read as a rolling mean of ``smooth_tokens`` tokens; ``"calm<"`` watches
    the low side (at -DEFAULT_Z: calibration sets high-side thresholds only). ``alerts``
    are rule texts as in ``emoprobe watch``, used exactly as written. The default watch
    list keeps only the emotions the bank has."""
    cal = calibrated_thresholds(bank)
    if watch is None:
        watch = [w for w in DEFAULT_WATCH if w.rstrip("<>") in bank.labels]
    rules: dict[str, Rule] = {}
    for item in watch:
        item = item.strip()
        if not item:
            continue
        low = item.endswith("<")
        emotion = item.rstrip("<>").strip()
        bank.index(emotion)
        t = -DEFAULT_Z if low else cal.get(emotion, DEFAULT_Z)
        r = Threshold(emotion, "<" if low else ">", round(float(t), 3), rolling=max(1, smooth_tokens))
        rules[str(r)] = r
    for text in alerts:
        r = parse_rule(text, bank.labels)
        rules[str(r)] = r
    return list(rules.values())


def leaves(rules: Sequence[Rule]) -> list[Threshold]:
    """The distinct thresholds of the rules, in order."""
    out: dict[str, Threshold] = {}
    for r in rules:
        for leaf in r.leaves():
            out.setdefault(str(leaf), leaf)
    return list(out.values())


def margin(rule: Rule, series: dict[str, np.ndarray]) -> np.ndarray:
    """How far past its threshold a rule is on each token (z units; > 0 when every part
    of an ``&`` and any part of an ``|`` is past). NaN where a rolling mean has no window yet."""
    if isinstance(rule, Threshold):
        v = series[str(rule)]
        return v - rule.value if rule.op == ">" else rule.value - v
    parts = np.stack([margin(r, series) for r in rule.rules])
    if isinstance(rule, AnyOf):
        return np.fmax.reduce(parts, 0)  # a part without a reading yet does not hold the others back
    if isinstance(rule, AllOf):
        return parts.min(0)  # NaN if any part has no reading: it cannot fire
    raise TypeError(f"unknown rule type {type(rule).__name__}")


# -- the math of one message ------------------------------------------------------------
def spans(mask: np.ndarray, gap: int = 0) -> list[tuple[int, int]]:
    """Maximal runs of True as [begin, end) pairs, joining runs split by <= ``gap`` Falses."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return []
    out = [[idx[0], idx[0] + 1]]
    for i in idx[1:]:
        if i - out[-1][1] <= gap:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(int(a), int(b)) for a, b in out]


@dataclass
class Encoded:
    conv: Conversation
    text: str
    ids: list[int]
    offsets: np.ndarray  # [tokens, 2] character offsets
    members: list[np.ndarray]  # token indices of each message
    cuts: list[dict | None] | None = None  # per message: what a token cap cut off (None: nothing)

    def __post_init__(self):
        self.cuts = self.cuts or [None] * len(self.members)


def cap_message(tokenizer, content: str, max_tokens: int | None) -> tuple[str, dict | None]:
    """``content`` cut to about its first ``max_tokens`` tokens (tokenized alone, so the
    chat's count may differ by a token at the edge), and a record of the cut."""
    if not max_tokens or len(content.encode("utf-8")) < max_tokens:  # a token is at least one byte
        return content, None
    head = content[:max_tokens * 64]
    offsets = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens and len(head) < len(content):  # tokens longer than 64 characters: count them all
        offsets = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return content, None
    end = offsets[max_tokens][0]
    return content[:end], {"max_tokens": max_tokens, "chars_read": end, "chars": len(content)}


def encode(tokenizer, conv: Conversation, max_message_tokens: int | None = MAX_MESSAGE_TOKENS) -> Encoded:
    """Render (``probes.tokens.render_chat``, as every reader does) and tokenize once,
    keeping each token's character offsets; each message first capped at
    ``max_message_tokens`` (None: no cap)."""
    capped = [cap_message(tokenizer, m["content"], max_message_tokens) for m in conv.messages]
    msgs = [dict(m, content=c) for m, (c, _) in zip(conv.messages, capped)]
    text, ids, offsets, members = encode_chat(tokenizer, msgs)
    return Encoded(conv, text, ids, np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
                   [np.asarray(m, dtype=np.int64) for m in members], [cut for _, cut in capped])


def _r(x, nd=3):
    return round(float(x), nd)


def conversation_lines(enc: Encoded, scores: np.ndarray, labels: list[str], rules: Sequence[Rule],
                       detail: bool = True) -> list[dict]:
    """The output lines of one conversation, one per message. Rules run over the
    conversation's message tokens in order (template tokens left out), so a rolling
    window carries across message boundaries as the text does. ``detail`` keeps what the
    report draws: each token's text, the watched series and the top emotions."""
    conv, n = enc.conv, len(enc.conv.messages)
    own = np.concatenate(enc.members) if enc.members else np.zeros(0, int)
    z = np.asarray(scores, np.float64)[own]
    parts = leaves(rules)
    series = {str(p): p.value_of(z, labels) for p in parts}
    past = {str(p): margin(p, series) for p in parts}
    fired = {str(r): r.evaluate(z, labels) for r in rules}
    margins = {str(r): margin(r, series) for r in rules}
    top = np.argsort(-z, 1)[:, :TOP]
    lines, start = [], 0
    for i, (m, idx) in enumerate(zip(conv.messages, enc.members)):
        line = {"conversation": conv.id, "index": i, "n_messages": n, "role": m["role"], "id": m.get("id"),
                "source": conv.source, "n_tokens": int(len(idx)), "cut": enc.cuts[i], "scores": None, "peak": {},
                "flags": [], "risk": None}
        sl = slice(start, start + len(idx))
        start += len(idx)
        if len(idx):
            zm = z[sl]
            starts = enc.offsets[idx, 0]
            ends = list(starts[1:]) + [enc.offsets[idx[-1], 1]]  # a token runs to the next one's start
            flags = []
            for r in rules:
                for a, b in spans(fired[str(r)][sl], gap=FLAG_GAP):
                    leaf = max(r.leaves(), key=lambda p: _nanmax(past[str(p)][sl][a:b]))
                    v = series[str(leaf)][sl][a:b]
                    flags.append({"emotion": leaf.emotion, "rule": str(r),
                                  "value": _r(np.nanmax(v) if leaf.op == ">" else np.nanmin(v)),
                                  "threshold": leaf.value, "tokens": [a, b - 1],
                                  "text": enc.text[starts[max(a - CONTEXT, 0)]:ends[min(b - 1 + CONTEXT, len(idx) - 1)]].strip()[:300]})
            risk = max((_nanmax(margins[str(r)][sl]) for r in rules), default=None)
            line.update(
                scores={e: _r(v) for e, v in zip(labels, zm.mean(0))},
                peak={e: [_r(zm[p, c]), int(p)] for c, (e, p) in enumerate(zip(labels, zm.argmax(0)))},
                flags=flags, risk=None if risk is None or not np.isfinite(risk) else _r(risk))
            if detail:
                line["detail"] = {
                    "tokens": [enc.text[a:b] for a, b in zip(starts, ends)],
                    "series": {k: [None if not np.isfinite(x) else _r(x) for x in v[sl]] for k, v in series.items()},
                    "top": [[[labels[c], _r(z[t, c], 2)] for c in top[t]] for t in range(sl.start, sl.stop)]}
        lines.append(line)
    return lines


def _nanmax(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    return float(np.nanmax(x)) if np.isfinite(x).any() else -np.inf


def scan_batch(reader, convs: Sequence[Conversation], rules: Sequence[Rule], detail: bool = True,
               max_message_tokens: int | None = MAX_MESSAGE_TOKENS, progress=None) -> list[tuple[str, list[dict], int]]:
    """(conversation id, output lines, tokens read) for each conversation of a batch;
    ``progress(n)`` hears of tokens as each forward batch finishes."""
    items = [encode(reader.tokenizer, c, max_message_tokens) for c in convs]
    keep = [it for it in items if it.ids]
    scores = dict(zip((id(it) for it in keep), reader.score_ids([it.ids for it in keep], progress))) if keep else {}
    out = []
    for it in items:
        s = scores.get(id(it), np.zeros((0, len(reader.labels)), np.float32))
        out.append((it.conv.id, conversation_lines(it, s, reader.labels, rules, detail), len(it.ids)))
    return out


# -- resumable output -------------------------------------------------------------------
def finished(out: Path) -> set[int]:
    """Conversations complete in ``out`` (as ``id_hash``es). Cuts whatever follows the last
    complete one (a conversation cut short by a kill) so it is written again, whole, once."""
    done: set[int] = set()
    if not out.exists():
        return done
    good_end = pos = 0
    current, seen = None, 0
    with open(out, "rb+") as f:
        for raw in f:
            pos += len(raw)
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError
                line = json.loads(raw)
                cid, idx, n = line["conversation"], line["index"], line["n_messages"]
            except (ValueError, KeyError, TypeError):
                break
            if cid != current:
                if seen:  # a conversation ended without all its lines
                    break
                current, seen, key = cid, 0, id_hash(cid)
            if idx != seen or key in done:
                break
            seen += 1
            if seen == n:
                done.add(key)
                good_end, current, seen = pos, None, 0
        f.truncate(good_end)
    return done


def scan_settings(bank, rules, detail, max_message_tokens=MAX_MESSAGE_TOKENS, reader: str | None = None) -> dict:
    """What a scan's output depends on; a resume with other settings is refused. ``reader``
    is the reader's ``spec`` (backend and dtype), so float32 and bfloat16 lines never mix."""
    if max_message_tokens is not None and (isinstance(max_message_tokens, bool) or max_message_tokens < 1):
        raise ValueError(f"max_message_tokens must be at least 1 (or None), got {max_message_tokens}")
    ident = json.dumps([bank.labels, bank.layer, bank.model, bank.readout], sort_keys=True)
    return {"bank": hashlib.sha256(ident.encode()).hexdigest()[:16], "model": bank.model.get("name"),
            "layer": bank.layer, "calibrated": bank.calibrated, "rules": [str(r) for r in rules], "detail": detail,
            "max_message_tokens": max_message_tokens, "reader": reader}


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.json")


def batches(items: Iterable[Conversation], max_chars: int = 120_000, max_convs: int = 32) -> Iterator[list[Conversation]]:
    batch, chars = [], 0
    for c in items:
        batch.append(c)
        chars += sum(len(m["content"]) for m in c.messages)
        if chars >= max_chars or len(batch) >= max_convs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# -- workers ----------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(factory, rules, detail, threads, max_message_tokens):
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before the factory imports torch
    _WORKER.update(reader=factory(), rules=rules, detail=detail, max_message_tokens=max_message_tokens)


def _work(convs):
    w = _WORKER
    return scan_batch(w["reader"], convs, w["rules"], w["detail"], w["max_message_tokens"])


# -- the scan ---------------------------------------------------------------------------
def scan(paths: Sequence[str | Path], out: str | Path, reader, *, bank=None, rules: Sequence[Rule] | None = None,
         fmt: str | None = None, workers: int = 1, progress: bool = True,
         overwrite: bool = False, detail: bool = True, max_chars: int = 120_000,
         max_message_tokens: int | None = MAX_MESSAGE_TOKENS, reader_spec: str | None = None) -> dict:
    """Scan log files into ``out`` (JSONL, one line per message) and return the summary,
    also written to ``<out stem>.summary.json``.

    ``reader`` is a reader (``probes.reader.BaseReader``) or, for ``workers > 1``, a
    picklable zero-argument factory that builds one in each worker process. ``bank``
    defaults to the reader's; ``rules`` default to ``make_rules(bank)``; each message is
    read up to ``max_message_tokens`` (None: whole), the cut noted in its line.
    ``reader_spec`` (default: the reader's ``spec``) goes into the settings; pass it with a
    factory (``monitor.runs.reader_spec``)."""
    out = Path(out)
    factory = None if hasattr(reader, "score_ids") else reader
    if factory is not None and workers <= 1:
        reader, factory = factory(), None
    bank = bank if bank is not None else getattr(reader, "bank", None)
    if bank is None:
        raise ValueError("scan needs the probe bank (pass bank=... with a reader factory)")
    rules = list(make_rules(bank) if rules is None else rules)
    settings = scan_settings(bank, rules, detail, max_message_tokens, reader_spec or getattr(reader, "spec", None))
    spath = summary_path(out)
    if overwrite:
        out.unlink(missing_ok=True)
    elif out.exists() and out.stat().st_size and spath.exists():
        try:
            before = json.loads(spath.read_text()).get("settings")
        except json.JSONDecodeError:
            before = None
        if before is not None and before != settings:
            raise ValueError(f"{out} was written with other settings ({before}); use another --out or --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished(out)
    spath.write_text(json.dumps({"status": "running", "settings": settings}, indent=1))

    skipped: list[dict] = []
    seen: set[int] = set()

    def todo():
        for item in read_logs(paths, fmt):
            if isinstance(item, Skipped):
                skipped.append({"source": item.source, "reason": item.reason})
                print(f"emoprobe scan: skipped {item.source}: {item.reason}", file=sys.stderr)
                continue
            key = id_hash(item.id)
            if key in seen:
                skipped.append({"source": item.source, "reason": f"duplicate conversation id {item.id}"})
            else:
                seen.add(key)
                if key not in done:
                    yield item

    from tqdm import tqdm

    bar = tqdm(unit="tok", unit_scale=True, desc="scan", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t0, n_tok, n_conv = time.perf_counter(), 0, 0
    with open(out, "a", encoding="utf-8") as f:
        def write(results, counted=False):
            nonlocal n_tok, n_conv
            for _, lines, n in results:
                f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
                f.flush()
                n_tok, n_conv = n_tok + n, n_conv + 1
                if not counted:
                    bar.update(n)
                bar.set_postfix(conv=n_conv, refresh=False)

        if factory is None:  # the bar moves with each forward batch, so a long message shows progress
            for batch in batches(todo(), max_chars):
                write(scan_batch(reader, batch, rules, detail, max_message_tokens, bar.update), counted=True)
        else:
            import multiprocessing as mp

            threads = max(1, (os.cpu_count() or 1) // workers)
            with mp.get_context("spawn").Pool(workers, _init_worker, (factory, rules, detail, threads,
                                                                      max_message_tokens)) as pool:
                pending: deque = deque()
                for batch in batches(todo(), max_chars):
                    pending.append(pool.apply_async(_work, (batch,)))
                    while len(pending) >= 2 * workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
    bar.close()
    seconds = time.perf_counter() - t0
    summary = summarize(out, skipped, settings)
    summary["this_run"] = {"conversations": n_conv, "tokens": n_tok, "seconds": round(seconds, 2),
                           "tokens_per_s": round(n_tok / seconds, 1) if seconds > 0 else None,
                           "already_done": len(done), "workers": workers}
    spath.write_text(json.dumps(summary, indent=1))
    return summary


def conversations(out: Path, detail: bool = False) -> Iterator[tuple[str, list[dict]]]:
    """(conversation id, lines) of a scan output, in file order; ``detail=False`` drops the
    per-token detail to keep memory small."""
    current, lines = None, []
    with open(out, encoding="utf-8") as f:
        for raw in f:
            line = json.loads(raw)
            if not detail:
                line.pop("detail", None)
            if line["conversation"] != current and lines:
                yield current, lines
                lines = []
            current = line["conversation"]
            lines.append(line)
    if lines:
        yield current, lines


def conversation_stats(cid: str, lines: list[dict]) -> dict:
    risks = [ln["risk"] for ln in lines if ln.get("risk") is not None]
    flags = Counter(fl["rule"] for ln in lines for fl in ln["flags"])
    return {"conversation": cid, "messages": len(lines), "tokens": sum(ln["n_tokens"] for ln in lines),
            "flags": sum(flags.values()), "by_rule": dict(flags.most_common()),
            "risk": max(risks) if risks else None, "source": lines[0].get("source")}


def rank_key(s: dict) -> tuple:
    """Larger is more at risk: flagged before the rest, then how far past a threshold."""
    return s["flags"] > 0, s["risk"] if s["risk"] is not None else -1e9


def rank(stats: list[dict]) -> list[dict]:
    """Most at risk first (ties keep their order)."""
    return sorted(stats, key=rank_key, reverse=True)


def summarize(out: Path, skipped: list[dict], settings: dict, top: int = 10) -> dict:
    """Totals over the whole output file (so a resumed scan summarizes everything), in one
    pass holding running totals and the ``top`` most at risk only."""
    per_rule, n = Counter(), Counter()
    heap: list = []  # the top conversations by rank, worst at heap[0]
    for k, (cid, lines) in enumerate(conversations(out)):
        s = conversation_stats(cid, lines)
        per_rule.update(s["by_rule"])
        n.update(conversations=1, messages=s["messages"], tokens=s["tokens"], flagged=s["flags"] > 0)
        key = (rank_key(s), -k)
        (heapq.heappush if len(heap) < top else heapq.heappushpop)(heap, (key, s))
    return {"status": "complete", "out": str(out), "settings": settings, "conversations": n["conversations"],
            "messages": n["messages"], "tokens": n["tokens"], "flagged_conversations": n["flagged"],
            "flags_per_rule": dict(per_rule.most_common()), "skipped": skipped,
            "most_flagged": [s for _, s in sorted(heap, key=lambda x: x[0], reverse=True)]}


def format_summary(summary: dict) -> str:
    lines = [f"scanned {summary['conversations']} conversations, {summary['messages']} messages, "
             f"{summary['tokens']} message tokens; {summary['flagged_conversations']} flagged"]
    run = summary.get("this_run")
    if run and run["seconds"]:
        lines.append(f"this run: {run['conversations']} conversations, {run['tokens']} tokens in {run['seconds']:.1f} s "
                     f"({run['tokens_per_s']:.0f} tokens/s)" + (f", {run['already_done']} already done" if run["already_done"] else ""))
    lines.append("rules: " + ", ".join(summary["settings"]["rules"]))
    if not summary["settings"]["calibrated"]:
        lines.append(f"note: the bank is not calibrated, so watched emotions use the default threshold "
                     f"{DEFAULT_Z:g} and scores are not z-scores against ordinary text (run `emoprobe calibrate`)")
    if summary["flags_per_rule"]:
        lines.append("flags: " + ", ".join(f"{r} x{n}" for r, n in summary["flags_per_rule"].items()))
    if summary["most_flagged"]:
        lines.append("most at risk:")
        for s in summary["most_flagged"]:
            risk = "-" if s["risk"] is None else f"{s['risk']:+.2f}"
            lines.append(f"  {s['conversation']:<48} flags {s['flags']:>3}  risk {risk}  "
                         + " ".join(f"{r} x{n}" for r, n in list(s["by_rule"].items())[:3]))
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])}:")
        lines += [f"  {s['source']}: {s['reason']}" for s in summary["skipped"][:20]]
    return "\n".join(lines)

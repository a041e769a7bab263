"""One self-contained HTML page from a scan output (no scripts, no external files):
conversations ranked by risk, and for the riskiest ones a timeline of the watched
emotions over their tokens (inline SVG) and the text as a per-token heat map whose
hover shows the top emotions, flagged spans outlined.

Everything is regenerated from ``scan.jsonl`` (+ ``scan.summary.json``):
``python -m monitor.report scan.jsonl scan.html``.
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np

from .scan import conversation_stats, conversations, rank, summary_path

COLORS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#1f77b4", "#2ca02c", "#17becf", "#bcbd22", "#7f7f7f")
WIDTH, HEIGHT, PAD = 960, 190, 34
MAX_POINTS = 1500

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1040px;color:#222}
h1{font-size:22px} h2{font-size:17px;margin-top:36px;border-top:1px solid #ddd;padding-top:14px}
table{border-collapse:collapse;width:100%} th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} tr.flagged td:first-child{border-left:4px solid #d62728}
.muted{color:#777} .legend span{margin-right:14px;white-space:nowrap} .legend i{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}
.msg{margin:10px 0;border-left:3px solid #ccc;padding:2px 10px} .msg.assistant{border-color:#1f77b4} .msg.tool{border-color:#999} .msg.user{border-color:#2ca02c} .msg.system{border-color:#bbb}
.role{font-size:12px;color:#555;margin-bottom:2px} .text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}
.t{position:relative;border-radius:2px} .t.f{box-shadow:inset 0 -3px #a00}
.t:hover{outline:1px solid #000} .t:hover::after{content:attr(data-top);position:absolute;left:0;top:1.5em;z-index:9;
 background:#222;color:#fff;padding:2px 6px;border-radius:3px;white-space:pre;font:12px system-ui,sans-serif}
.flag{color:#a00;font-size:12px} svg{display:block;margin:6px 0}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _downsample(y: np.ndarray, n: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Bucket means so a long conversation stays a light polyline; x in token units."""
    if len(y) <= n:
        return np.arange(len(y), dtype=float), y
    edges = np.linspace(0, len(y), n + 1).astype(int)
    return (edges[:-1] + edges[1:]) / 2 - 0.5, np.array([y[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])


def _level(v, leaf) -> np.ndarray:
    """0 at z = 0, 1 at the threshold, on the side the rule watches."""
    v = np.asarray([np.nan if x is None else x for x in v], float)
    m = v - leaf.value if leaf.op == ">" else leaf.value - v
    return np.nan_to_num(np.clip(1 + m / max(abs(leaf.value), 1.0), 0, 1.5) / 1.5)


def timeline_svg(lines: list[dict], parts: dict) -> str:
    """Watched quantities (e.g. a rolling mean of z) over the conversation's message
    tokens, thresholds dashed, message boundaries as thin lines, flagged spans shaded."""
    shown = [ln for ln in lines if ln.get("detail")]
    series = {k: np.concatenate([np.asarray([np.nan if x is None else x for x in ln["detail"]["series"].get(k, [None] * ln["n_tokens"])], float)
                                 for ln in shown] or [np.zeros(0)]) for k in parts}
    total = max(sum(ln["n_tokens"] for ln in shown), 1)
    vals = np.concatenate([v[np.isfinite(v)] for v in series.values()] + [np.array([p.value for p in parts.values()] + [-4.0, 4.0])])
    lo, hi = float(vals.min()) - 0.5, float(vals.max()) + 0.5
    x = lambda t: PAD + (WIDTH - PAD - 8) * (t + 0.5) / total  # noqa: E731
    y = lambda v: 8 + (HEIGHT - 28) * (hi - v) / (hi - lo)  # noqa: E731
    out = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img"><rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>']
    start = 0
    for ln in shown:  # flagged spans, then message boundaries
        for fl in ln["flags"]:
            a, b = start + fl["tokens"][0], start + fl["tokens"][1]
            out.append(f'<rect class="flagspan" x="{x(a - 0.5):.1f}" y="8" width="{max(x(b + 0.5) - x(a - 0.5), 2):.1f}" '
                       f'height="{HEIGHT - 28}" fill="#d62728" fill-opacity="0.12"><title>{_e(fl["rule"])}: {fl["value"]:+.2f}</title></rect>')
        out.append(f'<line x1="{x(start - 0.5):.1f}" x2="{x(start - 0.5):.1f}" y1="8" y2="{HEIGHT - 20}" stroke="#ddd"/>'
                   f'<text x="{x(start - 0.5) + 2:.1f}" y="{HEIGHT - 8}" font-size="10" fill="#888">{_e(ln["role"][:1].upper())}{ln["index"]}</text>')
        start += ln["n_tokens"]
    out.append(f'<line x1="{PAD}" x2="{WIDTH - 8}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#999" stroke-width="0.6"/>')
    for v in (lo + 0.5, 0.0, hi - 0.5):
        out.append(f'<text x="2" y="{y(v) + 4:.1f}" font-size="10" fill="#888">{v:+.1f}</text>')
    for k, (key, leaf) in enumerate(parts.items()):
        c = COLORS[k % len(COLORS)]
        out.append(f'<line x1="{PAD}" x2="{WIDTH - 8}" y1="{y(leaf.value):.1f}" y2="{y(leaf.value):.1f}" '
                   f'stroke="{c}" stroke-dasharray="4 3" stroke-width="0.8"/>')
        xs, ys = _downsample(series[key])
        ok = np.isfinite(ys)
        if ok.any():
            pts = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in zip(xs[ok], ys[ok]))
            out.append(f'<polyline class="series" data-rule="{_e(key)}" fill="none" stroke="{c}" stroke-width="1.3" points="{pts}"/>')
    out.append("</svg>")
    legend = "".join(f'<span><i style="background:{COLORS[k % len(COLORS)]}"></i>{_e(key)}</span>' for k, key in enumerate(parts))
    return "".join(out) + f'<div class="legend muted">{legend} <span>(z over message tokens; dashed: thresholds)</span></div>'


def heatmap_html(ln: dict, parts: dict) -> str:
    """The message's text, one span per token, shaded by how close the riskiest watched
    emotion came to its threshold; hover shows the top emotions; flagged tokens outlined."""
    d = ln["detail"]
    flagged = np.zeros(ln["n_tokens"], bool)
    for fl in ln["flags"]:
        flagged[fl["tokens"][0]:fl["tokens"][1] + 1] = True
    level = np.zeros(ln["n_tokens"])
    for key, leaf in parts.items():
        if key in d["series"]:
            level = np.maximum(level, _level(d["series"][key], leaf))
    out = []
    for t, (tok, top) in enumerate(zip(d["tokens"], d["top"])):
        tip = "\n".join(f"{e} {v:+.2f}" for e, v in top)
        out.append(f'<span class="t{" f" if flagged[t] else ""}" style="background:rgba(214,39,40,{level[t] * 0.75:.2f})" '
                   f'data-top="{_e(tip)}" title="{_e(tip)}">{_e(tok)}</span>')
    return "".join(out)


def _parts(keys) -> dict:
    from monitor.rules import parse_rule

    return {k: parse_rule(k) for k in keys}


def render_report(out: str | Path, summary: dict | None = None, top: int = 50) -> str:
    out = Path(out)
    if summary is None:
        sp = summary_path(out)
        summary = json.loads(sp.read_text()) if sp.exists() else {}
    stats = rank([conversation_stats(cid, lines) for cid, lines in conversations(out)])
    first = next((ln for _, ls in conversations(out, detail=True) for ln in ls if ln.get("detail")), None)
    parts = _parts(first["detail"]["series"] if first else [])  # the thresholds the rules compare
    rules = list((summary.get("settings") or {}).get("rules") or parts)
    chosen = {s["conversation"]: k for k, s in enumerate(stats[:top])}
    anchor = {cid: f"c{k}" for cid, k in chosen.items()}

    head = [f"<h1>emoprobe scan</h1><p>{len(stats)} conversations, {sum(s['messages'] for s in stats)} messages, "
            f"{sum(s['tokens'] for s in stats)} message tokens; <b>{sum(s['flags'] > 0 for s in stats)} flagged</b>. "
            f"Rules: {_e(', '.join(rules) or 'none')}."
            + (" Scores are z-scores against ordinary text." if (summary.get("settings") or {}).get("calibrated") else
               " The bank is not calibrated: default thresholds, scores not z-scores against ordinary text.")
            + "</p>"]
    if summary.get("skipped"):
        items = "".join(f"<li>{_e(s['source'])}: {_e(s['reason'])}</li>" for s in summary["skipped"][:50])
        head.append(f'<details><summary>{len(summary["skipped"])} skipped inputs</summary><ul>{items}</ul></details>')
    rows = []
    for k, s in enumerate(stats[:1000], 1):
        name = f'<a href="#{anchor[s["conversation"]]}">{_e(s["conversation"])}</a>' if s["conversation"] in anchor else _e(s["conversation"])
        risk = "" if s["risk"] is None else f"{s['risk']:+.2f}"
        by = ", ".join(f"{_e(r)} ×{n}" for r, n in list(s["by_rule"].items())[:3])
        rows.append(f'<tr class="{"flagged" if s["flags"] else ""}"><td class="n">{k}</td><td>{name}</td><td class="n">{s["messages"]}</td>'
                    f'<td class="n">{s["tokens"]}</td><td class="n">{s["flags"]}</td><td>{by}</td><td class="n">{risk}</td></tr>')
    table = ('<table class="ranked"><thead><tr><th>#</th><th>conversation</th><th>messages</th><th>tokens</th><th>flags</th>'
             '<th>flagged rules</th><th>risk (z past threshold)</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
             + (f'<p class="muted">{len(stats) - 1000} more conversations in the scan output.</p>' if len(stats) > 1000 else ""))

    sections = {}
    for cid, lines in conversations(out, detail=True):
        if cid not in chosen:
            continue
        msgs = []
        for ln in lines:
            flags = "".join(f'<div class="flag">⚑ {_e(fl["rule"])}: {fl["value"]:+.2f} at tokens {fl["tokens"][0]}–{fl["tokens"][1]}: '
                            f'“{_e(fl["text"][:160])}”</div>' for fl in ln["flags"])
            body = (heatmap_html(ln, parts) if ln.get("detail") else
                    '<span class="muted">(no per-token detail: scanned with --no-detail)</span>' if ln["n_tokens"] else
                    '<span class="muted">(no tokens)</span>')
            msgs.append(f'<div class="msg {_e(ln["role"])}"><div class="role">{_e(ln["role"])} · message {ln["index"]} · '
                        f'{ln["n_tokens"]} tokens</div><div class="text heatmap">{body}</div>{flags}</div>')
        s = stats[chosen[cid]]
        sections[chosen[cid]] = (f'<h2 id="{anchor[cid]}">{chosen[cid] + 1}. {_e(cid)}</h2><p class="muted">{s["flags"]} flags · '
                                 f'{s["messages"]} messages · source {_e(s["source"])}</p>'
                                 + (timeline_svg(lines, parts) if any(ln.get("detail") for ln in lines) else "")
                                 + "".join(msgs))
    body = "".join(head) + table + "".join(sections[k] for k in sorted(sections))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>emoprobe scan</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(out: str | Path, html_path: str | Path, summary: dict | None = None, top: int = 50) -> Path:
    html_path = Path(html_path)
    html_path.write_text(render_report(out, summary, top), encoding="utf-8")
    return html_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m monitor.report scan.jsonl scan.html")
    print(write_report(sys.argv[1], sys.argv[2]))

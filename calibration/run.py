"""Calibrate a probe bank: read the suites and the neutral set once, then derive
curves, z-score baselines, alert thresholds and the danger calibrator from those readouts.

All reading goes through one raw (un-z-scored) reader, and every later number is an
affine or monotone function of those raw readouts, so nothing is read twice.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from probes.bank import ProbeBank

from . import stats
from .neutral import NeutralSet, chat_tokens, neutral_set
from .suites import Suite, resolve_suites

KEY_EMOTIONS = ("afraid", "calm", "desperate", "nervous", "alarmed", "relieved", "hopeful", "at ease")
RISK_TENSORS = ("risk_weight", "risk_bias", "risk_x", "risk_y")
USABLE_AUROC = 0.6  # below this held-out AUROC the risk is stored but flagged: it barely ranks danger
RISK_FORMULA = ("z = h @ W.T + b (bank.head(), z-scores [n]); s = z @ risk_weight + risk_bias[0]; "
                "risk = interp(s, risk_x, risk_y), flat outside [risk_x[0], risk_x[-1]]; "
                "equivalently risk_y[0] + sum_j slope_j * (clip(s, risk_x[j], risk_x[j+1]) - risk_x[j]), "
                "slope_j = (risk_y[j+1] - risk_y[j]) / (risk_x[j+1] - risk_x[j])")


def _log(msg: str) -> None:
    print(f"[emoprobe] {msg}", file=sys.stderr, flush=True)


def risk_from_scores(bank: ProbeBank, scores: np.ndarray) -> np.ndarray:
    """Reference risk P(dangerous situation) for z-scores ``scores`` [..., n] (what
    ``bank.head()`` gives). The exporters must match this::

        s    = scores @ risk_weight + risk_bias[0]           # risk_weight [n], risk_bias [1]
        risk = risk_y[0] + sum_j slope_j * (clip(s, risk_x[j], risk_x[j+1]) - risk_x[j])
        slope_j = (risk_y[j+1] - risk_y[j]) / (risk_x[j+1] - risk_x[j])

    i.e. ``np.interp(s, risk_x, risk_y)``: piecewise linear, flat outside the knots;
    risk_x strictly increasing, risk_y non-decreasing in [0, 1]. Folded into the read
    layer it is one extra column of the head: see ``risk_head``.
    """
    t = bank.tensors
    missing = [k for k in RISK_TENSORS if k not in t]
    if missing:
        raise ValueError(f"the bank has no risk calibrator (missing tensors {missing}); run `emoprobe calibrate`")
    w, b, x, p = (np.asarray(t[k], np.float64) for k in RISK_TENSORS)
    if w.shape != (len(bank.labels),) or b.shape != (1,) or x.shape != p.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("bank risk tensors have inconsistent shapes: risk_weight [n], risk_bias [1], risk_x/risk_y [k>=2]")
    return stats.piecewise_linear(np.asarray(scores, np.float64) @ w + b[0], x, p)


def risk_head(bank: ProbeBank) -> tuple[np.ndarray, float]:
    """The risk score s as one affine map of raw activations: s = h @ w + b (w [D])."""
    W, b = bank.head()
    w = bank.tensors["risk_weight"].astype(np.float64)
    return (W.astype(np.float64).T @ w).astype(np.float32), float(b.astype(np.float64) @ w + bank.tensors["risk_bias"][0])


# -- reading -----------------------------------------------------------------------------
def raw_reader(model, tokenizer, bank: ProbeBank, batch_size: int = 16):
    """A TorchReader giving the bank's raw scores (no z-scoring)."""
    from probes.reader import TorchReader

    n = len(bank.labels)
    tensors = dict(bank.tensors, score_mean=np.zeros(n, np.float32), score_std=np.ones(n, np.float32))
    return TorchReader(model, tokenizer, ProbeBank(bank.labels, bank.layer, bank.model, tensors, bank.readout),
                       batch_size=batch_size)


def read_prompts(reader, texts: list[str], at: str, bar=None, chunk: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), chunk):
        out.append(reader.read_chat(texts[i:i + chunk], at=at))
        if bar is not None:
            bar.update(len(texts[i:i + chunk]))
    return np.concatenate(out) if out else np.zeros((0, len(reader.labels)))


def read_neutral(reader, neutral: NeutralSet, at: str = "reply", bar=None, chunk: int = 64):
    """One pass over the neutral set: the prompts' readouts at ``at`` [prompts, n] and
    the readouts of every token of message text, prompts' and chats' [tokens, n]."""
    tok = reader.tokenizer
    items = []  # (ids, message-token rows, row read at `at` or None)
    for p in neutral.prompts:
        ids, inside = chat_tokens(tok, [{"role": "user", "content": p}], generation_prompt=True)
        items.append((ids, inside, len(ids) - 1 if at == "reply" else inside[-1]))  # the user's last token
    items += [(*chat_tokens(tok, c), None) for c in neutral.chats]
    at_rows, token_rows = [], []
    for i in range(0, len(items), chunk):
        part = items[i:i + chunk]
        for (_, inside, pos), sc in zip(part, reader.score_ids([x[0] for x in part])):
            token_rows.append(sc[inside])
            if pos is not None:
                at_rows.append(sc[pos])
        if bar is not None:
            bar.update(len(part))
    return np.stack(at_rows), np.concatenate(token_rows)


def suite_prompts(suites: list[Suite]) -> list[tuple[int, int, int, int, str]]:
    """(suite, family, template, level, text) for every prompt of every suite."""
    return [(si, fi, t, lv, text) for si, s in enumerate(suites) for fi, f in enumerate(s.families)
            for t, lv, text in f.prompts()]


def suite_readouts(reader, suites: list[Suite], at: str = "reply", bar=None) -> list[list[np.ndarray]]:
    """Readouts [templates, levels, n] for each family of each suite, in one batched pass
    (batching never changes a readout, so mixing suites in a batch is safe)."""
    rows = suite_prompts(suites)
    scores = read_prompts(reader, [r[-1] for r in rows], at, bar)
    out = [[np.zeros((len(f.templates), len(f.levels), scores.shape[1])) for f in s.families] for s in suites]
    for (si, fi, t, lv, _), sc in zip(rows, scores):
        out[si][fi][t, lv] = sc
    return out


# -- analysis ----------------------------------------------------------------------------
def family_result(fam, Z: np.ndarray, labels: list[str], min_rho: float) -> dict:
    """Curves (mean over paraphrases), Spearman rho per emotion, pass/fail against ``expect``."""
    curve, spread = Z.mean(0), Z.std(0)
    rho = stats.spearman(curve)
    checks = {}
    for e, d in fam.expect.items():
        i = labels.index(e)
        sign = 1 if d == "increasing" else -1
        per_t = [float(stats.spearman(Z[t][:, [i]])[0]) for t in range(len(Z))]
        checks[e] = {"expect": d, "rho": round(float(rho[i]), 4), "pass": bool(sign * rho[i] >= min_rho),
                     "per_template_rho": [round(r, 3) for r in per_t]}
    order = np.argsort(rho)
    shown = list(dict.fromkeys([e for e in (*fam.expect, *KEY_EMOTIONS) if e in labels]
                               + [labels[i] for i in order[::-1][:3]] + [labels[i] for i in order[:3]]))
    plotted = [e for e in dict.fromkeys((*fam.expect, "afraid", "calm")) if e in labels]
    return {
        "levels": list(fam.levels), "danger_from": fam.danger_from, "templates": list(fam.templates),
        "expect": fam.expect, "pass": all(c["pass"] for c in checks.values()), "checks": checks,
        "spearman": {e: round(float(r), 4) for e, r in zip(labels, rho)},
        "top_increasing": [[labels[i], round(float(rho[i]), 3)] for i in order[::-1][:5]],
        "top_decreasing": [[labels[i], round(float(rho[i]), 3)] for i in order[:5]],
        "curves": {e: curve[:, labels.index(e)].round(4).tolist() for e in shown},
        "curves_sd": {e: spread[:, labels.index(e)].round(4).tolist() for e in plotted},
    }


def risk_calibration(Z_fams: list[np.ndarray], fams: list, names: list[str], labels: list[str]) -> dict | None:
    """Choose score x calibrator by leave-one-family-out Brier; fit the winner on all."""
    Z, y, g = [], [], []
    for k, (Zf, f) in enumerate(zip(Z_fams, fams)):
        if f.danger_index is None:
            continue
        T, L, n = Zf.shape
        Z.append(Zf.reshape(T * L, n))
        y.append(np.tile(np.arange(L) >= f.danger_index, T).astype(float))
        g.append(np.full(T * L, k))
    if len(Z) < 3:
        return None
    Z, y, g = np.concatenate(Z), np.concatenate(y), np.concatenate(g)
    scores = [s for s in stats.SCORES if s != "afraid-calm" or {"afraid", "calm"} <= set(labels)]
    from threadpoolctl import threadpool_limits  # (a scikit-learn dependency)

    cands = []
    with threadpool_limits(1):  # hundreds of small solves: threads only contend
        for s in scores:
            for c, r in stats.lofo(s, Z, y, g, labels).items():
                cands.append({"score": s, "calibrator": c, **r})
        best = min(cands, key=lambda r: (r["brier"], -np.nan_to_num(r["auroc"])))
        w, b, x, p = stats.fit_risk(best["score"], best["calibrator"], Z, y, g, labels)
    pred = best["predictions"]
    per_family = {}
    for k in np.unique(g):
        m = g == k
        per_family[names[k]] = {"auroc": round(stats.auroc(pred[m], y[m]), 4),
                                "mean_risk_safe": round(float(pred[m & (y == 0)].mean()), 4),
                                "mean_risk_dangerous": round(float(pred[m & (y == 1)].mean()), 4)}
    return {
        "tables": (w, b, x, p),
        "doc": {"score": best["score"], "calibrator": best["calibrator"], "selected_by": "leave-one-family-out Brier",
                "usable": bool(np.nan_to_num(best["auroc"]) >= USABLE_AUROC),
                "samples": int(len(y)), "families": int(len(np.unique(g))), "dangerous_fraction": round(float(y.mean()), 4),
                "lofo": {"auroc": round(best["auroc"], 4), "brier": round(best["brier"], 4), "ece": round(best["ece"], 4),
                         "ece_bins": stats.ECE_BINS, "reliability": best["reliability"]},
                "candidates": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()
                                if k in ("score", "calibrator", "auroc", "brier", "ece")} for c in cands],
                "per_family": per_family, "knots": int(len(x)), "formula": RISK_FORMULA},
    }


# -- the whole step ----------------------------------------------------------------------
def calibrate_run(run_dir, model, tokenizer, bank: ProbeBank, suites=None, out=None, at: str = "reply",
                  progress: bool = True, *, fpr: float = 0.01, batch_size: int = 16, save: bool = True,
                  neutral: NeutralSet | None = None) -> ProbeBank:
    """Calibrate ``bank`` and return the calibrated copy (saved to ``run_dir/bank`` unless
    ``save=False``). Writes ``run_dir/calibration/<suite>.json`` + PNGs, ``calibration.json``
    (baseline, thresholds, risk) and, with ``out``, everything in one JSON file."""
    from tqdm import tqdm

    if at not in ("reply", "user"):
        raise ValueError(f"at must be 'reply' or 'user', got {at!r}")
    suites = resolve_suites(suites)
    for s in suites:
        s.check_labels(bank.labels)
    neutral = neutral or neutral_set()
    reader = raw_reader(model, tokenizer, bank, batch_size)
    total = sum(len(f.templates) * len(f.levels) for s in suites for f in s.families) + len(neutral)
    with tqdm(total=total, desc="calibrating", unit="text", disable=not progress) as bar:
        raw_suites = suite_readouts(reader, suites, at, bar)
        raw_at, raw_tokens = read_neutral(reader, neutral, at, bar)
    new, suite_docs, summary = calibrate_readouts(bank, suites, raw_suites, raw_at, raw_tokens, at, fpr,
                                                  n_chats=len(neutral.chats))
    write_outputs(Path(run_dir) / "calibration", suite_docs, summary)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(to_json({**summary, "suites": suite_docs}))
    if save:
        new.save(Path(run_dir) / "bank")
    passed = sum(d["passed"] for d in suite_docs.values())
    risk = summary["risk"]
    _log(f"calibration: {passed}/{sum(d['total'] for d in suite_docs.values())} families pass; "
         + ("no risk calibrator (needs 3 families with danger_from)" if risk is None else
            f"risk LOFO AUROC {risk['lofo']['auroc']:.3f}, ECE {risk['lofo']['ece']:.3f}"
            + ("" if risk["usable"] else f" (below {USABLE_AUROC}: flagged usable=false)")))
    return new


def calibrate_readouts(bank: ProbeBank, suites: list[Suite], raw_suites, raw_at: np.ndarray, raw_tokens: np.ndarray,
                       at: str = "reply", fpr: float = 0.01, n_chats: int = 0):
    """Everything after reading, from raw readouts: the calibrated bank, one result
    document per suite and the summary (baselines, thresholds, risk).

    Two baselines, because the token that opens the reply is stereotyped (its readouts
    vary far less than those of running text): the bank's z-scores are against ordinary
    message text, token by token (what ``read`` and the monitor show); ``position_mean``
    / ``position_std`` (in those z units) re-standardize readouts at the reply token
    against ordinary prompts read there. Curves and the risk fit use the latter."""
    labels = bank.labels
    mu, sd = raw_tokens.mean(0), raw_tokens.std(0) + 1e-6
    z = lambda a: (a - mu) / sd  # noqa: E731
    Z_at = z(raw_at)
    pm, ps = Z_at.mean(0), Z_at.std(0) + 1e-6
    zp = lambda a: (z(a) - pm) / ps  # noqa: E731
    thr_tokens, thr_at = stats.threshold_at_fpr(z(raw_tokens), fpr), stats.threshold_at_fpr(Z_at, fpr)

    suite_docs, fams, names, Z_fams = {}, [], [], []
    for s, raws in zip(suites, raw_suites):
        results = {}
        for f, R in zip(s.families, raws):
            results[f.name] = family_result(f, zp(R), labels, s.min_rho)
            fams.append(f), names.append(f"{s.name}/{f.name}"), Z_fams.append(zp(R))
        suite_docs[s.name] = {
            "suite": s.name, "description": s.description, "model": bank.model.get("name"), "layer": bank.layer,
            "at": at, "unit": f"z against ordinary prompts read at the same token ({at})", "min_rho": s.min_rho,
            "passed": sum(r["pass"] for r in results.values()), "total": len(results), "families": results}

    risk = risk_calibration(Z_fams, fams, names, labels)
    tensors = {k: v for k, v in bank.tensors.items() if k not in RISK_TENSORS}
    tensors.update(score_mean=mu, score_std=sd, alert_threshold=thr_tokens, position_mean=pm, position_std=ps,
                   position_alert_threshold=thr_at)
    if risk is not None:  # fitted on position z-scores; folded here into bank z-scores
        w, b, x, p = risk["tables"]
        tensors.update(risk_weight=w / ps, risk_bias=np.array([b - (pm / ps) @ w]), risk_x=x, risk_y=p)
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    baseline = {"tokens": int(len(raw_tokens)), "prompts": int(len(raw_at)), "chats": n_chats,
                "what": "every token of the messages' text (prompts and chats), not the template's preamble",
                "source": "calibration/neutral.json"}
    position = {"at": at, "prompts": int(len(raw_at)), "tensors": ["position_mean", "position_std"],
                "rule": "z_position = (z - position_mean) / position_std, for readouts at that token"}
    summary = {
        "model": bank.model, "layer": bank.layer, "at": at, "baseline": baseline, "position_baseline": position,
        "thresholds": {"fpr": fpr, "rule": "alert when z > threshold (bank z units); FPR <= fpr on the neutral set",
                       "per_token": {e: round(float(t), 4) for e, t in zip(labels, thr_tokens)},
                       f"at_{at}": {e: round(float(t), 4) for e, t in zip(labels, thr_at)}},
        "risk": None if risk is None else risk["doc"],
        "suites": {k: {"passed": d["passed"], "total": d["total"], "file": f"{k}.json"} for k, d in suite_docs.items()},
    }
    new = ProbeBank(labels, bank.layer, bank.model, tensors, bank.readout, dict(bank.meta))
    if risk is not None:
        summary["risk"]["neutral_prompt_risk"] = _quantiles(risk_from_scores(new, Z_at))
    new.meta["calibration"] = {
        "version": 1, "unit": "z-score against ordinary message text, per token", "baseline": baseline,
        "position": position,
        "alert": {"fpr": fpr, "rule": "alert when z > threshold",
                  "tensors": {"alert_threshold": "any token of text", "position_alert_threshold": f"the {at} token"}},
        "risk": None if risk is None else {
            "tensors": list(RISK_TENSORS), "formula": RISK_FORMULA,
            **{k: summary["risk"][k] for k in ("score", "calibrator", "knots", "usable")},
            **{k: summary["risk"]["lofo"][k] for k in ("auroc", "brier", "ece")}},
        "suites": summary["suites"],
    }
    return new, suite_docs, summary


def _quantiles(r: np.ndarray) -> dict:
    return {"mean": round(float(r.mean()), 4), "p50": round(float(np.quantile(r, 0.5)), 4),
            "p99": round(float(np.quantile(r, 0.99)), 4), "frac_above_0.5": round(float((r > 0.5).mean()), 4)}


# -- files and figures (drawn only from the JSON's own numbers) -------------------------
def to_json(doc) -> str:
    """Strict JSON: NaN (e.g. AUROC of a one-class family) becomes null."""
    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(doc), indent=1, allow_nan=False)


def write_outputs(directory: Path, suite_docs: dict, summary: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, doc in suite_docs.items():
        (directory / f"{name}.json").write_text(to_json(doc))
        plot_suite(doc, directory / f"{name}.png")
    (directory / "calibration.json").write_text(to_json(summary))
    if summary["risk"] is not None:
        plot_reliability(summary["risk"], directory / "reliability.png")


def plot_suite(doc: dict, path: Path) -> None:
    """One panel per family: mean curve over paraphrases, +-1 sd band, danger line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = doc["families"]
    cols = min(3, len(fams))
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.flat, fams.items()):
        pos = np.arange(len(r["levels"]))
        for e, sd in r["curves_sd"].items():
            c, sd = np.array(r["curves"][e]), np.array(sd)
            ax.plot(pos, c, marker="o", ms=3, label=f"{e} rho={r['spearman'][e]:+.2f}")
            ax.fill_between(pos, c - sd, c + sd, alpha=0.15)
        if r["danger_from"] is not None:
            ax.axvline(r["levels"].index(r["danger_from"]) - 0.5, color="k", ls=":", lw=1)
        ax.set_xticks(pos, [str(x) for x in r["levels"]], rotation=35, fontsize=7, ha="right")
        ax.set_title(f"{name} ({'pass' if r['pass'] else 'FAIL'})", fontsize=9)
        ax.set_ylabel(f"z vs ordinary prompts ({doc['at']} token)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.suptitle(f"suite {doc['suite']}: {doc['passed']}/{doc['total']} families pass (safe -> dangerous)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(risk: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in risk["lofo"]["reliability"] if b["n"]]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax.plot([b["mean_p"] for b in bins], [b["frac_dangerous"] for b in bins], marker="o")
    lo = risk["lofo"]
    ax.set(ylabel="fraction dangerous", xlim=(0, 1), ylim=(0, 1),
           title=f"risk ({risk['score']}, {risk['calibrator']}), leave-one-family-out\n"
                 f"AUROC {lo['auroc']:.3f}  Brier {lo['brier']:.3f}  ECE {lo['ece']:.3f}")
    hx.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=1 / risk["lofo"]["ece_bins"] * 0.9)
    hx.set(xlabel="predicted risk", ylabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

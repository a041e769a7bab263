"""Calibrate a probe bank: read the suites and the neutral set once, then derive
curves, z-score baselines, alert thresholds and the danger calibrator from those readouts.

All reading goes through one raw (un-z-scored) reader, and every later number is an
affine or monotone function of those raw readouts, so nothing is read twice.
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from probes.bank import ProbeBank

from . import positions, stats
from .neutral import NeutralSet, chat_tokens, neutral_set
from .suites import resolve_suites

KEY_EMOTIONS = ("afraid", "calm", "desperate", "nervous", "alarmed", "relieved", "hopeful", "at ease")
RISK_TENSORS = ("risk_weight", "risk_bias", "risk_x", "risk_y")
USABLE_AUROC = 0.6  # the held-out AUROC's lower CI bound must clear this, else the risk is flagged unusable
MIN_GROUPS = 5  # fewer held-out groups than this give no meaningful group-bootstrap CI
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


def read_neutral(reader, neutral: NeutralSet, at: str = "reply", bar=None, chunk: int = 64):
    """One pass over the neutral set: the prompts' readouts at ``at`` [prompts, n] and
    the readouts of every token of message text, prompts' and chats' [tokens, n]."""
    tok = reader.tokenizer
    items = []  # (ids, message-token rows, True when the row at `at` is kept)
    for p in neutral.prompts:
        ids, inside = chat_tokens(tok, [{"role": "user", "content": p}], generation_prompt=True)
        items.append((ids, inside, True))
    items += [(*chat_tokens(tok, c), False) for c in neutral.chats]
    at_rows, token_rows = [], []
    for i in range(0, len(items), chunk):
        part = items[i:i + chunk]
        for (_, inside, keep), sc in zip(part, reader.score_ids([x[0] for x in part])):
            token_rows.append(sc[inside])
            if keep:
                at_rows.append(positions.pick(sc, at, inside))
        if bar is not None:
            bar.update(len(part))
    return np.stack(at_rows), np.concatenate(token_rows)


def suite_rows(suites) -> list[tuple]:
    """(suite, item, role, template, level, text) for every prompt: a family's own sweep
    (role "danger"), its control ("control"), a pair's members ("safe", "danger")."""
    rows = []
    for si, s in enumerate(suites):
        if s.kind == "pairs":
            for pi, p in enumerate(s.pairs):
                rows += [(si, pi, "safe", 0, 0, p.safe), (si, pi, "danger", 0, 0, p.danger)]
            continue
        for fi, f in enumerate(s.families):
            rows += [(si, fi, "danger", t, lv, text) for t, lv, text in f.prompts()]
            if f.control is not None:
                rows += [(si, fi, "control", t, lv, text) for t, lv, text in f.control.prompts()]
    return rows


def unflatten(suites, rows, scores: np.ndarray) -> list:
    """Readouts in the suites' shape: per family {"danger": [T, L, n], "control": [T', L, n]
    or None}; per pair suite {"safe": [pairs, n], "danger": [pairs, n]}."""
    n = scores.shape[1]
    out = []
    for s in suites:
        if s.kind == "pairs":
            out.append({r: np.zeros((len(s.pairs), n)) for r in ("safe", "danger")})
        else:
            out.append([{"danger": np.zeros((len(f.templates), len(f.levels), n)),
                         "control": None if f.control is None else
                         np.zeros((len(f.control.templates), len(f.control.levels), n))} for f in s.families])
    for (si, i, role, t, lv, _), sc in zip(rows, scores):
        if suites[si].kind == "pairs":
            out[si][role][i] = sc
        else:
            out[si][i][role][t, lv] = sc
    return out


# -- analysis ----------------------------------------------------------------------------
def family_result(fam, Z: np.ndarray, labels: list[str], min_rho: float, Zc: np.ndarray | None = None) -> dict:
    """Curves (mean over paraphrases), Spearman rho per emotion, and per expected emotion
    rho(danger), rho(control) and the pass rule (``stats.control_check``). A family
    without a control cannot show that it measures danger rather than the number: it
    never passes (``pass_without_control`` keeps the bare effect)."""
    curve, spread = Z.mean(0), Z.std(0)
    rho = stats.spearman(curve)
    rho_c = None if Zc is None else stats.spearman(Zc.mean(0))
    checks = {}
    for e, d in fam.expect.items():
        i = labels.index(e)
        sign = 1 if d == "increasing" else -1
        c = stats.control_check(rho[i], 0.0 if rho_c is None else rho_c[i], sign, min_rho)
        if rho_c is None:
            c.update(rho_control=None, ratio=None, **{"pass": False})
        c.update(expect=d, per_template_rho=[round(float(stats.spearman(Z[t][:, [i]])[0]), 3) for t in range(len(Z))])
        checks[e] = c
    order = np.argsort(rho)
    shown = list(dict.fromkeys([e for e in (*fam.expect, *KEY_EMOTIONS) if e in labels]
                               + [labels[i] for i in order[::-1][:3]] + [labels[i] for i in order[:3]]))
    plotted = [e for e in dict.fromkeys((*fam.expect, "afraid", "calm")) if e in labels]
    doc = {
        "levels": list(fam.levels), "danger_from": fam.danger_from, "templates": list(fam.templates),
        "expect": fam.expect, "pass": all(c["pass"] for c in checks.values()),
        "pass_without_control": all(c["pass_without_control"] for c in checks.values()), "checks": checks,
        "control": None if fam.control is None else {"templates": list(fam.control.templates),
                                                      "levels": list(fam.control.levels), "from": fam.control.source},
        "spearman": {e: round(float(r), 4) for e, r in zip(labels, rho)},
        "top_increasing": [[labels[i], round(float(rho[i]), 3)] for i in order[::-1][:5]],
        "top_decreasing": [[labels[i], round(float(rho[i]), 3)] for i in order[:5]],
        "curves": {e: curve[:, labels.index(e)].round(4).tolist() for e in shown},
        "curves_sd": {e: spread[:, labels.index(e)].round(4).tolist() for e in plotted},
    }
    if Zc is not None:
        doc["control_curves"] = {e: Zc.mean(0)[:, labels.index(e)].round(4).tolist() for e in plotted}
    return doc


def signed(expect: dict, labels: list[str]) -> np.ndarray:
    """Weight vector of the combined expected move: +1 increasing, -1 decreasing."""
    w = np.zeros(len(labels))
    for e, d in expect.items():
        w[labels.index(e)] = 1 if d == "increasing" else -1
    return w


def pairs_result(ps, safe: np.ndarray, danger: np.ndarray, labels: list[str], report_ids: set) -> dict:
    """Share of pairs where each expected emotion (and their signed sum, ``combined``)
    moves the expected way from the safe member to the dangerous one, with sign tests;
    over all pairs, the report side, the select side and each domain."""
    D = danger - safe
    ids = [p.id for p in ps.pairs]
    subsets = {"all": np.ones(len(ids), bool), "report": np.array([i in report_ids for i in ids]),
               "select": np.array([i not in report_ids for i in ids])}
    subsets.update({f"domain:{d}": np.array([p.domain == d for p in ps.pairs])
                    for d in dict.fromkeys(p.domain for p in ps.pairs)})
    moves = {e: D[:, labels.index(e)] * (1 if d == "increasing" else -1) for e, d in ps.expect.items()}
    moves["combined"] = D @ signed(ps.expect, labels)
    out = {k: {e: stats.pair_stats(m[sel]) for e, m in moves.items()} for k, sel in subsets.items() if sel.any()}
    return {"expect": ps.expect, "combined": " + ".join(f"{'' if d == 'increasing' else '-'}{e}"
                                                          for e, d in ps.expect.items()),
            "results": out,
            "per_pair": [{"id": p.id, "domain": p.domain, "side": "report" if p.id in report_ids else "select",
                          **{e: round(float(m[i]), 4) for e, m in moves.items()}} for i, p in enumerate(ps.pairs)]}


# -- which item is for choosing, which only for reporting (committed before any readout) ----
def load_split() -> dict:
    """``calibration/split.json``: report-side family names and pair ids. Items it does not
    name (a user's own suites) are on the select side."""
    doc = json.loads((resources.files("calibration") / "split.json").read_text())
    rep = doc.get("report", {})
    if not isinstance(rep.get("families"), list) or not isinstance(rep.get("pairs"), list):
        raise ValueError("calibration/split.json: field 'report' must hold lists 'families' and 'pairs'")
    return {"families": set(rep["families"]), "pairs": set(rep["pairs"])}


def risk_data(suites, Zs, split: dict) -> dict:
    """Rows for the risk score: danger families (labelled by danger_from), their controls
    (all safe, in the family's group), pairs (safe 0, dangerous 1, grouped by domain)."""
    Z, y, g, rep = [], [], [], []
    for s, zs in zip(suites, Zs):
        if s.kind == "pairs":
            for i, p in enumerate(s.pairs):
                Z += [zs["safe"][i], zs["danger"][i]]
                y += [0.0, 1.0]
                g += [f"pairs:{p.domain}"] * 2
                rep += [p.id in split["pairs"]] * 2
            continue
        for f, z in zip(s.families, zs):
            if f.danger_index is None:
                continue
            T, L, n = z["danger"].shape
            parts = [(z["danger"].reshape(T * L, n), np.tile(np.arange(L) >= f.danger_index, T))]
            if z["control"] is not None:
                c = z["control"].reshape(-1, n)
                parts.append((c, np.zeros(len(c), bool)))
            for rows, lab in parts:
                Z.append(rows), y.append(lab.astype(float))
                g += [f"{s.name}/{f.name}"] * len(rows)
                rep += [f.name in split["families"]] * len(rows)
    if not Z:
        return {"Z": np.zeros((0, 0)), "y": np.zeros(0), "groups": np.array([]), "report": np.zeros(0, bool)}
    Z = np.vstack([np.atleast_2d(z) for z in Z])
    y = np.concatenate([np.atleast_1d(v) for v in y])
    return {"Z": Z, "y": y, "groups": np.array(g), "report": np.array(rep, bool)}


def usable_verdict(auc: float, ci: tuple, side: str, groups: int, pairs_auc: float | None) -> tuple[bool, str]:
    """The gate and its one-line reason: the lower CI bound of the held-out AUROC must
    clear USABLE_AUROC (a point estimate over a handful of families proves little), and so
    must the held-out AUROC on the fixed-number pairs alone: they are the one test where
    the size of a number cannot carry the score (on the default model the sweeps pass the
    first condition by ranking numbers while the pairs stay at chance)."""
    lo, hi = ci
    where = "report-side families and pair domains" if side == "report" else \
        "select-side groups (no report split: these also chose the form)"
    head = f"held-out AUROC {auc:.3f} [95% CI {lo:.3f}, {hi:.3f}] over {where}"
    if not np.isfinite(lo) or groups < MIN_GROUPS:
        return False, f"not usable: {head}; too few groups ({groups} < {MIN_GROUPS}) for a CI that means anything"
    if lo < USABLE_AUROC:
        return False, f"not usable: {head}; the lower bound must clear {USABLE_AUROC}"
    if pairs_auc is None or not np.isfinite(pairs_auc):
        return False, f"not usable: {head}, but no fixed-number pairs were held out to show it is not ranking numbers"
    if pairs_auc < USABLE_AUROC:
        return False, (f"not usable: {head}, but on the fixed-number pairs alone {pairs_auc:.3f} < {USABLE_AUROC}: "
                       "it ranks the sizes of numbers, not danger")
    return True, f"usable: {head}; the lower bound clears {USABLE_AUROC}, and the fixed-number pairs alone give {pairs_auc:.3f}"


def risk_calibration(data: dict, labels: list[str]) -> dict | None:
    """Choose score x calibrator by leave-one-group-out Brier on the select side only;
    score that form once by leave-one-group-out over every group (families with their
    controls; pairs by domain) on the report side, with a CI resampling whole groups; fit
    the tables on everything."""
    Z, y, g, rep = data["Z"], data["y"], data["groups"], data["report"]
    sel = ~rep
    if len(np.unique(g[sel])) < 3 or len(np.unique(g)) < 3:
        return None
    scores = [s for s in stats.SCORES if s != "afraid-calm" or {"afraid", "calm"} <= set(labels)]
    from threadpoolctl import threadpool_limits  # (a scikit-learn dependency)

    cands = []
    with threadpool_limits(1):  # hundreds of small solves: threads only contend
        for s in scores:
            for c, r in stats.lofo(s, Z[sel], y[sel], g[sel], labels).items():
                cands.append({"score": s, "calibrator": c, **r})
        best = min(cands, key=lambda r: (r["brier"], -np.nan_to_num(r["auroc"])))
        pred = stats.lofo(best["score"], Z, y, g, labels, calibrators=(best["calibrator"],))[best["calibrator"]]["predictions"]
        w, b, x, p = stats.fit_risk(best["score"], best["calibrator"], Z, y, g, labels)
    side = "report" if rep.any() else "select"
    m = rep if rep.any() else sel
    pm, ym, gm = pred[m], y[m], g[m]
    auc = stats.auroc(pm, ym)
    ci = stats.group_bootstrap(lambda i: stats.auroc(pm[i], ym[i]), gm)
    rel = stats.reliability(pm, ym)
    part = lambda mask: round(stats.auroc(pm[mask], ym[mask]), 4)  # noqa: E731
    is_pair = np.char.startswith(gm.astype(str), "pairs:")
    usable, reason = usable_verdict(auc, ci, side, len(np.unique(gm)), part(is_pair) if is_pair.any() else None)
    per_group = {}
    for k in np.unique(g):
        mk = g == k
        per_group[str(k)] = {"side": "report" if rep[mk].any() and not sel[mk].any() else
                             ("select" if not rep[mk].any() else "both"),
                             "auroc": round(stats.auroc(pred[mk], y[mk]), 4),
                             "mean_risk_safe": round(float(pred[mk & (y == 0)].mean()), 4),
                             "mean_risk_dangerous": round(float(pred[mk & (y == 1)].mean()), 4)}
    return {
        "tables": (w, b, x, p),
        "doc": {"score": best["score"], "calibrator": best["calibrator"],
                "selected_by": "leave-one-group-out Brier on the select side only",
                "usable": bool(usable), "usable_reason": reason, "usable_rule": f"lower 95% CI bound of the held-out "
                f"AUROC >= {USABLE_AUROC} and held-out AUROC on the fixed-number pairs alone >= {USABLE_AUROC}", "side": side,
                "samples": int(len(y)), "groups": int(len(np.unique(g))), "families": int(len(np.unique(g[~np.char.startswith(g.astype(str), 'pairs:')]))),
                "dangerous_fraction": round(float(y.mean()), 4),
                "heldout": {"auroc": round(auc, 4), "auroc_ci95": [round(ci[0], 4), round(ci[1], 4)],
                            "brier": round(stats.brier(pm, ym), 4), "ece": round(rel["ece"], 4), "ece_bins": stats.ECE_BINS,
                            "reliability": rel["bins"], "samples": int(m.sum()), "groups": int(len(np.unique(gm))),
                            "auroc_families_only": part(~is_pair) if (~is_pair).any() else None,
                            "auroc_pairs_only": part(is_pair) if is_pair.any() else None,
                            "protocol": "each group (a family with its control, or a pair domain) predicted by a score "
                                        "and calibrator fitted without it; CI resamples whole groups"},
                "select_lofo": {k: round(best[k], 4) for k in ("auroc", "brier", "ece")},
                "candidates": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()
                                if k in ("score", "calibrator", "auroc", "brier", "ece")} for c in cands],
                "per_group": per_group, "knots": int(len(x)), "formula": RISK_FORMULA},
    }


# -- the whole step ----------------------------------------------------------------------
def sweep_labels(suites, rows, split: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt row: danger label (nan: unlabelled), group and whether it is select-side."""
    y, g, sel = [], [], []
    for si, i, role, t, lv, _ in rows:
        s = suites[si]
        if s.kind == "pairs":
            p = s.pairs[i]
            y.append(float(role == "danger")), g.append(f"pairs:{p.domain}"), sel.append(p.id not in split["pairs"])
        else:
            f = s.families[i]
            lab = np.nan if f.danger_index is None else float(role == "danger" and lv >= f.danger_index)
            y.append(lab), g.append(f"{s.name}/{f.name}"), sel.append(f.name not in split["families"])
    return np.array(y), np.array(g), np.array(sel, bool)


def position_doc(sw: dict, n_items: int, y, g, sel, bank: ProbeBank, at: str) -> dict:
    """The position x layer sweep on the select side, and the chosen position."""
    names, nz = sw["positions"], slice(n_items, None)
    keep = sel & np.isfinite(y)
    labelled = len(np.unique(y[keep])) == 2
    ia, ic = bank.index("afraid"), bank.index("calm")
    bank_scores, layer_auc = {}, {}
    for k, p in enumerate(names):
        z = positions.standardize(sw["bank"][:, k], sw["bank"][nz, k])
        bank_scores[p] = positions.danger_score(z[:n_items, ia], z[:n_items, ic])[keep]
        zl = positions.standardize(sw["layers"][:, k], sw["layers"][nz, k])  # [items, L, 2]
        layer_auc[p] = [round(stats.auroc(positions.danger_score(zl[:n_items, j, 0], zl[:n_items, j, 1])[keep], y[keep]), 4)
                        if labelled else float("nan") for j in range(zl.shape[1])]
    if not labelled:
        choice = {"auroc": {}, "chosen": "reply" if at == "auto" else at, "rule": "no labelled select-side items"}
    else:
        choice = positions.choose(bank_scores, y[keep], g[keep])
    if at != "auto":
        choice = dict(choice, chosen=at, rule=f"given (--at {at}); the sweep is reported only")
    chosen = choice["chosen"]
    best_layer = int(np.nanargmax(layer_auc[chosen])) if labelled and chosen in layer_auc else bank.layer
    n_tpl = len(sw["tokens"])
    tokens = {"user": "user's last token", "user_mean": "mean over user's turn",
              **{f"reply-{k}": repr(sw["tokens"][n_tpl - 1 - k]) for k in range(1, n_tpl)},
              "reply": repr(sw["tokens"][-1]) if sw["tokens"] else ""}
    return {"model": bank.model.get("name"), "layer": bank.layer, "items": int(keep.sum()), "positions": names,
            "token": tokens, "bank": choice, "layers": layer_auc,
            "layer_note": (f"best layer for {chosen!r} with the per-layer vectors: {best_layer} (AUROC "
                           f"{layer_auc[chosen][best_layer]:.3f}) vs the bank's layer {bank.layer} "
                           f"({layer_auc[chosen][bank.layer]:.3f}); the bank keeps its layer (its readout is fitted "
                           f"there); rebuild with `emoprobe build --layer` to move it") if labelled else ""}


def calibrate_run(run_dir, model, tokenizer, bank: ProbeBank, suites=None, out=None, at: str = "auto",
                  progress: bool = True, *, fpr: float = 0.01, batch_size: int = 16, save: bool = True,
                  neutral: NeutralSet | None = None, split: dict | None = None) -> ProbeBank:
    """Calibrate ``bank`` and return the calibrated copy (saved to ``run_dir/bank`` unless
    ``save=False``). Every suite prompt and neutral prompt is read once at every layer and
    position (``positions.sweep``); ``at="auto"`` picks the read position on the select
    side of ``split``. Writes ``run_dir/calibration/<suite>.json`` + PNGs,
    ``calibration.json`` (positions, baseline, thresholds, risk) and, with ``out``,
    everything in one JSON file."""
    from tqdm import tqdm

    positions.check_at(at)
    suites = resolve_suites(suites)
    for s in suites:
        s.check_labels(bank.labels)
    for e in ("afraid", "calm"):
        bank.index(e)  # the sweep's readout; a bank without them fails here, before reading
    neutral = neutral or neutral_set()
    split = load_split() if split is None else split
    rows = suite_rows(suites)
    texts = [r[-1] for r in rows] + list(neutral.prompts)
    with tqdm(total=len(texts) + len(neutral), desc="calibrating", unit="text", disable=not progress) as bar:
        sw = positions.sweep(model, tokenizer, bank, texts, batch_size=batch_size, bar=bar)
        if at not in ("auto", *sw["positions"]):
            raise ValueError(f"position {at!r} does not exist for this chat template (positions: "
                             f"{', '.join(sw['positions'])})")
        y, g, sel = sweep_labels(suites, rows, split)
        pos = position_doc(sw, len(rows), y, g, sel, bank, at)
        chosen = pos["bank"]["chosen"]
        _, raw_tokens = read_neutral(raw_reader(model, tokenizer, bank, batch_size), neutral, "reply", bar)
    k = sw["positions"].index(chosen)
    raw_suites = unflatten(suites, rows, sw["bank"][:len(rows), k])
    new, suite_docs, summary = calibrate_readouts(bank, suites, raw_suites, sw["bank"][len(rows):, k], raw_tokens,
                                                  chosen, fpr, n_chats=len(neutral.chats), split=split)
    summary["positions"] = pos
    summary["read_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    new.meta["calibration"]["position"]["chosen_by"] = pos["bank"]["rule"]
    new.meta["calibration"]["read_dtype"] = summary["read_dtype"]
    write_outputs(Path(run_dir) / "calibration", suite_docs, summary)
    positions.plot_sweep(pos, Path(run_dir) / "calibration" / "positions.png")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(to_json({**summary, "suites": suite_docs}))
    if save:
        new.save(Path(run_dir) / "bank")
    fam = [d for d in suite_docs.values() if d.get("kind", "families") == "families"]
    risk = summary["risk"]
    _log(f"calibration at {chosen!r}: {sum(d['passed'] for d in fam)}/{sum(d['total'] for d in fam)} families pass "
         f"with controls ({sum(d['passed_without_control'] for d in fam)} without); "
         + ("no risk calibrator (needs 3 labelled groups on the select side)" if risk is None else
            f"risk {risk['usable_reason']}"))
    return new


def calibrate_readouts(bank: ProbeBank, suites, raw_suites, raw_at: np.ndarray, raw_tokens: np.ndarray,
                       at: str = "reply", fpr: float = 0.01, n_chats: int = 0, split: dict | None = None):
    """Everything after reading, from raw readouts at one position: the calibrated bank,
    one result document per suite and the summary (baselines, thresholds, risk).

    Two baselines, because a template position is stereotyped (its readouts vary far
    less than those of running text): the bank's z-scores are against ordinary message
    text, token by token (what ``read`` and the monitor show); ``position_mean`` /
    ``position_std`` (in those z units) re-standardize readouts at the calibrated position
    against ordinary prompts read there. Curves, pairs and the risk fit use the latter."""
    split = {"families": set(), "pairs": set()} if split is None else split
    labels = bank.labels
    mu, sd = raw_tokens.mean(0), raw_tokens.std(0) + 1e-6
    z = lambda a: (a - mu) / sd  # noqa: E731
    Z_at = z(raw_at)
    pm, ps = Z_at.mean(0), Z_at.std(0) + 1e-6
    zp = lambda a: (z(a) - pm) / ps  # noqa: E731
    thr_tokens, thr_at = stats.threshold_at_fpr(z(raw_tokens), fpr), stats.threshold_at_fpr(Z_at, fpr)

    suite_docs, Zs = {}, []
    unit = f"z against ordinary prompts read at the same position ({at})"
    for s, raws in zip(suites, raw_suites):
        head = {"suite": s.name, "kind": s.kind, "description": s.description, "model": bank.model.get("name"),
                "layer": bank.layer, "at": at, "unit": unit}
        if s.kind == "pairs":
            zs = {r: zp(raws[r]) for r in ("safe", "danger")}
            suite_docs[s.name] = {**head, **pairs_result(s, zs["safe"], zs["danger"], labels, split["pairs"])}
        else:
            zs = [{"danger": zp(r["danger"]), "control": None if r["control"] is None else zp(r["control"])} for r in raws]
            results = {f.name: dict(family_result(f, z_["danger"], labels, s.min_rho, z_["control"]),
                                    side="report" if f.name in split["families"] else "select")
                       for f, z_ in zip(s.families, zs)}
            suite_docs[s.name] = {
                **head, "min_rho": s.min_rho, "control_ratio": stats.CONTROL_RATIO,
                "rule": f"pass: every expected emotion moves its way with |rho| >= min_rho and the control's "
                        f"|rho| <= {stats.CONTROL_RATIO} x the danger's",
                "passed": sum(r["pass"] for r in results.values()),
                "passed_without_control": sum(r["pass_without_control"] for r in results.values()),
                "total": len(results), "families": results}
        Zs.append(zs)

    risk = risk_calibration(risk_data(suites, Zs, split), labels)
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
                "rule": "z_position = (z - position_mean) / position_std, for readouts at that position",
                "read_with": f"reader.read_chat(texts, at={at!r})"}
    summary = {
        "model": bank.model, "layer": bank.layer, "at": at, "baseline": baseline, "position_baseline": position,
        "thresholds": {"fpr": fpr, "rule": "alert when z > threshold (bank z units); FPR <= fpr on the neutral set",
                       "per_token": {e: round(float(t), 4) for e, t in zip(labels, thr_tokens)},
                       f"at_{at}": {e: round(float(t), 4) for e, t in zip(labels, thr_at)}},
        "risk": None if risk is None else risk["doc"],
        "suites": {k: {kk: d[kk] for kk in ("kind", "passed", "passed_without_control", "total") if kk in d}
                   | {"file": f"{k}.json"} for k, d in suite_docs.items()},
    }
    new = ProbeBank(labels, bank.layer, bank.model, tensors, bank.readout, dict(bank.meta))
    if risk is not None:
        summary["risk"]["neutral_prompt_risk"] = _quantiles(risk_from_scores(new, Z_at))
    new.meta["calibration"] = {
        "version": 2, "unit": "z-score against ordinary message text, per token", "baseline": baseline,
        "position": position,
        "alert": {"fpr": fpr, "rule": "alert when z > threshold",
                  "tensors": {"alert_threshold": "any token of text", "position_alert_threshold": f"the {at} position"}},
        "risk": None if risk is None else {
            "tensors": list(RISK_TENSORS), "formula": RISK_FORMULA, "at": at,
            **{k: summary["risk"][k] for k in ("score", "calibrator", "knots", "usable", "usable_reason")},
            **{k: summary["risk"]["heldout"][k] for k in ("auroc", "auroc_ci95", "brier", "ece")}},
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
        (plot_suite if doc["kind"] == "families" else plot_pairs)(doc, directory / f"{name}.png")
    (directory / "calibration.json").write_text(to_json(summary))
    if summary["risk"] is not None:
        plot_reliability(summary["risk"], directory / "reliability.png")


def plot_suite(doc: dict, path: Path) -> None:
    """One panel per family: mean curve over paraphrases, +-1 sd band, the control's mean
    curve dashed in the same colour, danger line."""
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
            if e in r.get("control_curves", {}):
                rc = r["checks"].get(e, {}).get("rho_control")
                ax.plot(pos, r["control_curves"][e], ls="--", lw=1, color=ax.lines[-1].get_color(),
                        label=f"{e} control" + ("" if rc is None else f" rho={rc:+.2f}"))
        if r["danger_from"] is not None:
            ax.axvline(r["levels"].index(r["danger_from"]) - 0.5, color="k", ls=":", lw=1)
        ax.set_xticks(pos, [str(x) for x in r["levels"]], rotation=35, fontsize=7, ha="right")
        ax.set_title(f"{name} ({'pass' if r['pass'] else 'FAIL'}; {r['side']})", fontsize=9)
        ax.set_ylabel(f"z vs ordinary prompts ({doc['at']} token)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.suptitle(f"suite {doc['suite']} at {doc['at']}: {doc['passed']}/{doc['total']} families pass with controls "
                 f"({doc['passed_without_control']} without; safe -> dangerous; dashed: control)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(risk: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in risk["heldout"]["reliability"] if b["n"]]
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax.plot([b["mean_p"] for b in bins], [b["frac_dangerous"] for b in bins], marker="o")
    lo = risk["heldout"]
    ax.set(ylabel="fraction dangerous", xlim=(0, 1), ylim=(0, 1),
           title=f"risk ({risk['score']}, {risk['calibrator']}), held out by group, {risk['side']} side\n"
                 f"AUROC {lo['auroc']:.3f} [{lo['auroc_ci95'][0]:.2f}, {lo['auroc_ci95'][1]:.2f}]  "
                 f"Brier {lo['brier']:.3f}  ECE {lo['ece']:.3f}")
    hx.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=1 / lo["ece_bins"] * 0.9)
    hx.set(xlabel="predicted risk", ylabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pairs(doc: dict, path: Path) -> None:
    """Per pair, the combined move (danger - safe) of the expected emotions, by domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["per_pair"]
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(rows)), 3.8))
    colours = {d: f"C{i}" for i, d in enumerate(dict.fromkeys(r["domain"] for r in rows))}
    from matplotlib.colors import to_rgba

    ax.bar(range(len(rows)), [r["combined"] for r in rows],
           color=[to_rgba(colours[r["domain"]], 1.0 if r["side"] == "report" else 0.45) for r in rows])
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["id"] for r in rows], rotation=90, fontsize=6)
    a = doc["results"]["all"]["combined"]
    ax.set(ylabel=f"{doc['combined']}: danger - safe (z)",
           title=f"suite {doc['suite']} at {doc['at']}: {a['right']}/{a['pairs']} pairs move the expected way "
                 f"(sign test p={a['sign_test_p']:.3g}); pale: select side")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

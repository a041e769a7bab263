"""The numbers behind calibration: rank correlation, neutral baselines, alert thresholds,
monotone calibrators stored as piecewise-linear tables, and their held-out metrics.

Everything here is plain numpy/sklearn on arrays, so it is tested with hypothesis
without a model.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

ECE_BINS = 10


def spearman(curves: np.ndarray) -> np.ndarray:
    """Spearman rho of each column of ``curves`` [levels, n] against the level position
    0..levels-1 (0 where a column is constant)."""
    r = rankdata(curves, axis=0)
    r = r - r.mean(0)
    pos = np.arange(len(curves)) - (len(curves) - 1) / 2
    den = np.sqrt((r ** 2).sum(0) * (pos ** 2).sum())
    return np.divide(pos @ r, den, out=np.zeros(r.shape[1]), where=den > 0)


def threshold_at_fpr(scores: np.ndarray, fpr: float) -> np.ndarray:
    """Per-column threshold t with mean(scores > t) <= fpr (alert rule: score > t).
    t is the (floor(fpr*m)+1)-th largest value, the lowest such t among the data."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    s = np.sort(np.asarray(scores, np.float64), axis=0)[::-1]
    return s[int(np.floor(fpr * len(s)))]


# -- calibrators: monotone maps score -> probability, as piecewise-linear tables ------------
def fit_calibrator(kind: str, s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(x, p)``, x strictly increasing, p non-decreasing in [0, 1]; evaluate with
    ``np.interp(s, x, p)`` (flat outside the knots). ``isotonic`` is exact; ``platt``
    tabulates a sigmoid on 65 knots (error < 1e-3)."""
    s, y = np.asarray(s, np.float64), np.asarray(y, np.float64)
    lo, hi = float(s.min()), float(s.max())
    if y.min() == y.max() or hi - lo < 1e-12:
        return np.array([lo, max(hi, lo + 1.0)]), np.full(2, y.mean())
    if kind == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0, y_max=1, increasing=True, out_of_bounds="clip").fit(s, y)
        x, p = iso.X_thresholds_, iso.y_thresholds_
        keep = np.r_[True, np.diff(x) > 1e-6 * max(1.0, np.abs(x).max())]  # survives float32
        x, p = x[keep], np.maximum.accumulate(np.clip(p[keep], 0, 1))
        return (x, p) if len(x) > 1 else (np.array([lo, lo + 1.0]), np.full(2, p[0]))
    if kind == "platt":
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e4).fit(((s - lo) / (hi - lo))[:, None], y)
        a, c = lr.coef_[0, 0] / (hi - lo), lr.intercept_[0] - lr.coef_[0, 0] * lo / (hi - lo)
        if a <= 1e-12:  # a non-increasing fit: the monotone answer is a constant
            return np.array([lo, hi]), np.full(2, y.mean())
        x = (np.linspace(-8, 8, 65) - c) / a
        return x, 1 / (1 + np.exp(-(a * x + c)))
    raise ValueError(f"calibrator must be 'isotonic' or 'platt', got {kind!r}")


def piecewise_linear(s: np.ndarray, x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``np.interp`` written as the sum of clipped ramps the ONNX exporter folds:
    p0 + sum_j slope_j * (clip(s, x_j, x_j+1) - x_j)."""
    s = np.asarray(s, np.float64)[..., None]
    x, p = np.asarray(x, np.float64), np.asarray(p, np.float64)
    slope = np.diff(p) / np.diff(x)
    return p[0] + ((np.clip(s, x[:-1], x[1:]) - x[:-1]) * slope).sum(-1)


# -- metrics --------------------------------------------------------------------------------
def auroc(p: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney form (ties count half), equal to sklearn's roc_auc_score and cheap
    enough for thousands of bootstrap resamples; nan with one class."""
    p, y = np.asarray(p, np.float64), np.asarray(y) > 0.5
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(p)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(p) - np.asarray(y)) ** 2))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error over ``bins`` equal-width bins of [0, 1] (the last bin
    includes 1): ECE = sum_b n_b/N * |mean p_b - mean y_b|, with the bins themselves."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            gap = abs(p[m].mean() - y[m].mean())
            ece += m.mean() * gap
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                          "mean_p": round(float(p[m].mean()), 4), "frac_dangerous": round(float(y[m].mean()), 4)})
        else:
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": 0, "mean_p": None, "frac_dangerous": None})
    return {"ece": float(ece), "bins": table}


# -- the risk score: a linear read of the z-scores, then a calibrator ------------------------
SCORES = ("afraid-calm", "ridge")
CALIBRATORS = ("isotonic", "platt")


def fit_score(kind: str, Z: np.ndarray, y: np.ndarray, labels: list[str], alpha: float = 1.0) -> tuple[np.ndarray, float]:
    """Weight [n] and bias of the linear risk score s = z @ w + b, oriented so higher s
    means more danger. ``afraid-calm`` is the paper's prior (nothing fitted but the sign);
    ``ridge`` is a ridge regression of the label on all z-scores (closed form, so the
    nested leave-one-family-out loops stay cheap); the calibrator turns s into a probability."""
    if kind == "afraid-calm":
        w = np.zeros(len(labels))
        w[labels.index("afraid")], w[labels.index("calm")] = 1.0, -1.0
        a = auroc(Z @ w, y)
        return (-w if a < 0.5 else w), 0.0
    if kind == "ridge":
        mz = Z.mean(0)
        Zc = Z - mz
        w = np.linalg.solve(Zc.T @ Zc + alpha * len(y) * np.eye(Z.shape[1]), Zc.T @ (y - y.mean()))
        return w, float(y.mean() - mz @ w)
    raise ValueError(f"score must be one of {SCORES}, got {kind!r}")


def _folds(groups: np.ndarray):
    for g in np.unique(groups):
        yield g, groups != g, groups == g


def heldout_scores(kind: str, Z, y, groups, labels) -> np.ndarray:
    """Scores the calibrator is fitted on: for a learned score, each family scored by a
    weight fitted without it, so the probabilities are not fitted on the score's own
    training data; the fixed prior needs no holding out."""
    if kind != "ridge" or len(np.unique(groups)) < 3:
        w, b = fit_score(kind, Z, y, labels)
        return Z @ w + b
    s = np.zeros(len(y))
    for _, tr, te in _folds(groups):
        w, b = fit_score(kind, Z[tr], y[tr], labels)
        s[te] = Z[te] @ w + b
    return s


def fit_risk(kind: str, calibrator: str, Z, y, groups, labels) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(weight, bias, knots x, knots p) of the risk score fitted on all families."""
    w, b = fit_score(kind, Z, y, labels)
    x, p = fit_calibrator(calibrator, heldout_scores(kind, Z, y, groups, labels), y)
    return w, b, x, p


def lofo(kind: str, Z, y, groups, labels, calibrators=CALIBRATORS) -> dict:
    """Leave-one-family-out: fit score and calibrator on the other families, predict the
    held-out one. Returns {calibrator: metrics and predictions}."""
    pred = {c: np.zeros(len(y)) for c in calibrators}
    for _, tr, te in _folds(groups):
        w, b = fit_score(kind, Z[tr], y[tr], labels)
        s_tr = heldout_scores(kind, Z[tr], y[tr], groups[tr], labels)
        for c in calibrators:
            pred[c][te] = piecewise_linear(Z[te] @ w + b, *fit_calibrator(c, s_tr, y[tr]))
    out = {}
    for c, p in pred.items():
        rel = reliability(p, y)
        out[c] = {"auroc": auroc(p, y), "brier": brier(p, y), "ece": rel["ece"], "reliability": rel["bins"],
                  "predictions": p}
    return out


# -- danger vs number size: controls and fixed-number pairs --------------------------------
CONTROL_RATIO = 0.5  # a family passes only if |rho(control)| <= this x |rho(danger)|


def control_check(rho_danger: float, rho_control: float, sign: int, min_rho: float) -> dict:
    """One family and emotion: the danger sweep must move the expected way by ``min_rho``
    and the matched no-danger sweep by at most half as much (else the sweep measures the
    number, not the danger). ``ratio`` = |rho(control)| / |rho(danger)| (inf when the
    danger effect is 0)."""
    rd, rc = float(rho_danger), float(rho_control)
    ratio = abs(rc) / abs(rd) if rd != 0 else float("inf")
    effect = sign * rd >= min_rho
    return {"rho": round(rd, 4), "rho_control": round(rc, 4), "ratio": round(ratio, 4) if np.isfinite(ratio) else ratio,
            "pass_without_control": bool(effect), "pass": bool(effect and abs(rc) <= CONTROL_RATIO * abs(rd))}


def sign_test(k: int, n: int) -> float:
    """One-sided sign test: P(X >= k), X ~ Binomial(n, 1/2) (n = pairs that moved at all)."""
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else 1.0


def pair_stats(diff: np.ndarray) -> dict:
    """``diff`` [pairs]: (danger - safe) readout, signed so that positive is the expected
    move. Accuracy counts ties as wrong; the sign test drops them (they carry no sign)."""
    diff = np.asarray(diff, np.float64)
    k, n = int((diff > 0).sum()), int((diff != 0).sum())
    return {"pairs": int(len(diff)), "right": k, "accuracy": round(k / len(diff), 4) if len(diff) else float("nan"),
            "sign_test_p": sign_test(k, n), "mean_diff": round(float(diff.mean()), 4) if len(diff) else float("nan")}


def group_resamples(metric, groups: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``metric(index array)`` over ``n_boot`` resamples of whole groups with replacement
    (families, pair domains: items of one family are not independent draws); resamples
    where the metric is undefined (one class) are left out."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in uniq]
    vals = (metric(np.concatenate([members[i] for i in rng.integers(0, len(uniq), len(uniq))])) for _ in range(n_boot))
    return np.array([v for v in vals if np.isfinite(v)], float)


def group_bootstrap(metric, groups: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile CI of ``metric(index array)`` over ``group_resamples``; NaN when most
    resamples leave it undefined."""
    vals = group_resamples(metric, groups, n_boot, seed)
    if len(vals) < n_boot / 2:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))

"""Emotion vectors (the paper's mean differences, denoised) and a trained linear probe.

Everything works on standardized activations: the residual stream has outlier
dimensions thousands of times larger than the median, which would otherwise own every
projection and distance.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data


def standardizer(X: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale of activations [n, d]."""
    X = np.asarray(X, dtype=np.float64)
    return X.mean(0), X.std(0) + eps


def neutral_components(Z_neutral: np.ndarray, variance: float = 0.5) -> np.ndarray:
    """Orthonormal top principal components [k, d] of neutral activations that together
    explain ``variance`` of their variance (the paper's denoising basis)."""
    Zc = Z_neutral - Z_neutral.mean(0)
    _, s, vt = np.linalg.svd(Zc, full_matrices=False)
    if np.sum(s**2) == 0:
        return vt[:0]
    share = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(share, variance) + 1)
    return vt[:k]


def emotion_vectors(Z: np.ndarray, y: np.ndarray, n_classes: int, noise: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors [n_classes, d]: each class mean minus the mean of class means, with
    the ``noise`` components projected out. Classes with no samples get zero vectors."""
    d = Z.shape[1]
    means = np.zeros((n_classes, d))
    present = np.zeros(n_classes, dtype=bool)
    for c in range(n_classes):
        rows = Z[y == c]
        if len(rows):
            means[c] = rows.mean(0)
            present[c] = True
    V = means - means[present].mean(0)
    V[~present] = 0
    before = np.linalg.norm(V, axis=1, keepdims=True)
    if noise is not None and len(noise):
        V = V - (V @ noise.T) @ noise
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    # A vector that lies (numerically) inside the noise subspace has no direction left.
    return np.divide(V, norms, out=np.zeros_like(V), where=norms > 1e-9 * np.maximum(before, 1e-12))


class EmotionProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardized activations.

    The scaling is learned inside ``fit`` so the probe is one linear map of the raw
    residual stream: ``coef_`` and ``intercept_`` already include it.
    """

    def __init__(self, C: float = 0.1, max_iter: int = 300):
        self.C = C
        self.max_iter = max_iter

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        self.classes_ = unique_labels(y)
        self.mean_, self.scale_ = standardizer(X)
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter)
        lr.fit((X - self.mean_) / self.scale_, y)
        # Fold the standardization into one affine map of raw activations.
        self.coef_ = lr.coef_ / self.scale_
        self.intercept_ = lr.intercept_ - self.coef_ @ self.mean_
        self.n_iter_ = lr.n_iter_
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores  # sklearn's binary convention

    def predict_proba(self, X):
        s = self.decision_function(X)
        s = np.column_stack([-s / 2, s / 2]) if s.ndim == 1 else s
        p = np.exp(s - s.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), 1)]


class ShrinkageLDAProbe(EmotionProbe):
    """Covariance-aware readout: linear discriminant analysis with Ledoit-Wolf
    shrinkage on standardized activations. Unlike the difference of means it discounts
    directions along which stories of one emotion vary anyway. ``coef_``/``intercept_``
    map raw activations, like ``EmotionProbe``'s, so it exports and reads the same way."""

    def __init__(self, shrinkage="auto"):
        self.shrinkage = shrinkage

    def fit(self, X, y):
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        X, y = validate_data(self, X, y)
        self.classes_ = unique_labels(y)
        if len(self.classes_) < 2:
            raise ValueError("ShrinkageLDAProbe needs samples of at least 2 classes in the data; got 1 class")
        self.mean_, self.scale_ = standardizer(X)
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=self.shrinkage)
        lda.fit((X - self.mean_) / self.scale_, y)
        coef, icpt = lda.coef_, lda.intercept_
        if len(self.classes_) == 2:  # sklearn keeps one row for two classes
            coef, icpt = coef[0], icpt[0]
        self.coef_ = np.atleast_2d(coef / self.scale_)
        self.intercept_ = np.atleast_1d(icpt - self.coef_ @ self.mean_)
        return self


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([yi in row for yi, row in zip(y, top)]))

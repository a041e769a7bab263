"""Held-out metrics for a bank's readout and the baselines it must beat.

Every score matrix is [n_texts, n_emotions]. Metrics: top-1 and top-5 over all labels,
top-1 among the 12 headline emotions (rows of those emotions, argmax over their 12
columns), accuracy over the 10 emotion families fixed in ``probes/data/emotion_groups.json``
(the predicted emotion's family is the true one's), and the mean rank of the true label
(1 = first). Baselines on the same folds: TF-IDF + logistic regression on the raw texts
(what the words alone give), the same readout at layer 0, and shuffled labels.
"""
from __future__ import annotations

import json

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from .corpus import DATA
from .handwritten import HEADLINE
from .vectors import EmotionProbe, ShrinkageLDAProbe, emotion_vectors, neutral_components, standardizer, topk_accuracy



def families(labels: list[str]) -> np.ndarray:
    """Family index of each label (-1 for a label outside the committed grouping)."""
    groups = json.loads(DATA.joinpath("emotion_groups.json").read_text())["groups"]
    fam = {e: i for i, members in enumerate(groups.values()) for e in members}
    return np.array([fam.get(e, -1) for e in labels])


def metrics(scores: np.ndarray, y: np.ndarray, labels: list[str]) -> dict:
    """The report's metrics for scores [n, len(labels)] against true indices y."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y)
    rank = 1 + (scores > scores[np.arange(len(y)), y][:, None]).sum(1)
    fam = families(labels)
    out = {"n": int(len(y)), "top1": topk_accuracy(scores, y, 1), "top5": topk_accuracy(scores, y, 5),
           "family_top1": float(np.mean(fam[scores.argmax(1)] == fam[y])), "mean_rank": float(rank.mean())}
    cols = [labels.index(e) for e in HEADLINE if e in labels]
    rows = np.isin(y, cols)
    if rows.any():
        pick = np.array(cols)[scores[np.ix_(rows, cols)].argmax(1)]
        out["headline_top1"] = float(np.mean(pick == y[rows]))
        out["headline_n"] = int(rows.sum())
    return out


def chance(labels: list[str]) -> dict:
    """What guessing gives on each metric (families weighted by their sizes)."""
    n = len(labels)
    sizes = np.bincount(families(labels)[families(labels) >= 0])
    out = {"top1": 1 / n, "top5": min(5, n) / n, "family_top1": float(np.sum((sizes / n) ** 2)), "mean_rank": (n + 1) / 2}
    head = [e for e in HEADLINE if e in labels]
    if head:
        out["headline_top1"] = 1 / len(head)
    return out


# --- readers fitted on training rows -----------------------------------------------

def vector_fit(X: np.ndarray, y: np.ndarray, N: np.ndarray, n_classes: int):
    """(mean, scale, unit directions [n_classes, d]): the denoised difference of means in
    per-dimension standardized space, standardized over stories and neutral texts."""
    mu, sd = standardizer(np.vstack([X, N]))
    return mu, sd, emotion_vectors((X - mu) / sd, y, n_classes, neutral_components((N - mu) / sd))


def fit_vectors(X: np.ndarray, y: np.ndarray, N: np.ndarray, n_classes: int):
    """The paper's readout as one affine map (W, b) of raw activations, centred on the
    mean of the class means."""
    mu, sd, V = vector_fit(X, y, N, n_classes)
    Z = (X - mu) / sd
    centre = np.mean([Z[y == c].mean(0) for c in np.unique(y)], 0)
    W = V / sd
    return W, -W @ mu - V @ centre


def class_map(estimator, n_classes: int):
    """A fitted linear classifier as (W [n_classes, d], b): classes it never saw score
    -1e4; sklearn's single row for two classes becomes two opposite rows."""
    coef, icpt = np.atleast_2d(estimator.coef_), np.atleast_1d(estimator.intercept_)
    if len(estimator.classes_) == 2 and len(coef) == 1:
        coef, icpt = np.vstack([-coef, coef]) / 2, np.array([-icpt[0], icpt[0]]) / 2
    W, b = np.zeros((n_classes, coef.shape[1])), np.full(n_classes, -1e4)
    W[estimator.classes_], b[estimator.classes_] = coef, icpt
    return W, b


READERS = {"vectors": lambda X, y, N, n, C: fit_vectors(X, y, N, n),
           "lda": lambda X, y, N, n, C: class_map(ShrinkageLDAProbe().fit(X, y), n),
           "probe": lambda X, y, N, n, C: class_map(EmotionProbe(C=C).fit(X, y), n)}


def fit_readout(reader: str, X: np.ndarray, y: np.ndarray, N: np.ndarray, n_classes: int, C: float = 0.1):
    """One affine map (W, b) of raw activations for the named reader."""
    return READERS[reader](X, y, N, n_classes, C)


def heldout(reader: str, X: np.ndarray, y: np.ndarray, groups: np.ndarray, N: np.ndarray, n_classes: int,
            folds: int = 5, C: float = 0.1) -> np.ndarray:
    """Out-of-fold scores [n, n_classes]: each fold's texts scored by a reader fitted on
    the other folds' topics only."""
    scores = np.zeros((len(y), n_classes))
    for train, test in GroupKFold(folds).split(X, y, groups):
        W, b = fit_readout(reader, X[train], y[train], N, n_classes, C)
        scores[test] = X[test] @ W.T + b
    return scores


def tfidf_model(texts: list[str], y: np.ndarray, n_classes: int):
    """Words alone: TF-IDF of the 30k most frequent word 1-2-grams + logistic regression.
    Returns a scorer. (All 57k n-grams: 2.5x slower, no better held out. Keep lbfgs's
    default tolerance: at 1e-3 it stops after one step on small corpora and scores nothing.)"""
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=30000)
    clf = LogisticRegression(C=10.0, max_iter=1000).fit(vec.fit_transform(texts), y)

    def score(new_texts: list[str]) -> np.ndarray:
        out = np.full((len(new_texts), n_classes), -1e4)
        d = clf.decision_function(vec.transform(new_texts))
        out[:, clf.classes_] = np.column_stack([-d / 2, d / 2]) if d.ndim == 1 else d  # binary: one column
        return out
    return score


def heldout_tfidf(texts: list[str], y: np.ndarray, groups: np.ndarray, n_classes: int, folds: int = 5) -> np.ndarray:
    texts = np.asarray(texts, dtype=object)
    scores = np.zeros((len(y), n_classes))
    for train, test in GroupKFold(folds).split(texts, y, groups):
        scores[test] = tfidf_model(list(texts[train]), y[train], n_classes)(list(texts[test]))
    return scores

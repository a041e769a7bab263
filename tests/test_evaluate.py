"""Held-out metrics, the covariance-aware readout and the words-alone baseline."""
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.utils.estimator_checks import check_estimator

from probes import evaluate
from probes.corpus import emotions
from probes.vectors import ShrinkageLDAProbe

LABELS = emotions()


def test_lda_probe_follows_the_estimator_contract():
    check_estimator(ShrinkageLDAProbe())


def test_metrics_on_known_answers():
    y = np.array([LABELS.index("afraid"), LABELS.index("calm"), LABELS.index("terrified")])
    scores = np.zeros((3, len(LABELS)))
    scores[0, LABELS.index("afraid")] = 3          # right
    scores[1, LABELS.index("sad")] = 3             # wrong, calm second
    scores[1, LABELS.index("calm")] = 2
    scores[2, LABELS.index("scared")] = 3          # wrong emotion, right family (fear), terrified second
    scores[2, LABELS.index("terrified")] = 1
    m = evaluate.metrics(scores, y, LABELS)
    assert m["top1"] == 1 / 3 and m["top5"] == 1.0
    assert m["family_top1"] == 2 / 3
    # ranks 1, 2 and 2
    assert m["mean_rank"] == (1 + 2 + 2) / 3
    # among the 12 headline emotions: afraid right; calm loses to sad; terrified is not headline
    assert m["headline_n"] == 2 and m["headline_top1"] == 0.5


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (20, 12), elements=st.floats(-5, 5)), st.integers(0, 2**31 - 1))
def test_metrics_do_not_depend_on_label_order(scores, seed):
    labels = LABELS[:12]
    y = np.arange(20) % 12
    rng = np.random.default_rng(seed)
    scores = scores + 1e-6 * rng.permutation(scores.size).reshape(scores.shape)  # no ties to break
    perm = rng.permutation(12)
    a = evaluate.metrics(scores, y, labels)
    b = evaluate.metrics(scores[:, perm], np.argsort(perm)[y], [labels[i] for i in perm])
    assert a == b


def test_perfect_scores_reach_one_and_chance_is_below():
    y = np.arange(171)
    m = evaluate.metrics(np.eye(171), y, LABELS)
    assert (m["top1"], m["family_top1"], m["mean_rank"], m["headline_top1"]) == (1.0, 1.0, 1.0, 1.0)
    ch = evaluate.chance(LABELS)
    assert ch["top1"] == 1 / 171 and 0.1 <= ch["family_top1"] < 0.2 and ch["headline_top1"] == 1 / 12


def test_families_cover_every_emotion_once():
    fam = evaluate.families(LABELS)
    assert (fam >= 0).all() and len(set(fam)) == 10


def _blobs(seed=0, n_per=30, d=12, k=4, spread=0.6, nuisance=8.0):
    """Classes that differ along planted directions, with strong shared nuisance variance
    along one other direction (which a difference of means cannot discount)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d))
    nuisance = rng.normal(size=d) * nuisance
    X = np.vstack([means[c] + spread * rng.normal(size=(n_per, d)) + rng.normal(size=(n_per, 1)) * nuisance
                   for c in range(k)])
    return X, np.repeat(np.arange(k), n_per), np.tile(np.arange(n_per) % 5, k)


def test_heldout_readers_beat_shuffled_labels():
    X, y, groups = _blobs(nuisance=0.5)
    N = np.random.default_rng(1).normal(size=(20, X.shape[1]))
    for reader in ("vectors", "lda"):
        good = evaluate.metrics(evaluate.heldout(reader, X, y, groups, N, 4), y, LABELS[:4])["top1"]
        bad = evaluate.metrics(evaluate.heldout(reader, X, np.random.default_rng(2).permutation(y), groups, N, 4),
                               y, LABELS[:4])["top1"]
        assert good > 0.8 and bad < 0.5, (reader, good, bad)


def test_lda_discounts_within_class_variance_that_means_cannot():
    X, y, groups = _blobs(spread=1.5)
    N = np.zeros((5, X.shape[1]))  # no denoising help for the vectors
    lda = evaluate.metrics(evaluate.heldout("lda", X, y, groups, N, 4), y, LABELS[:4])["top1"]
    vec = evaluate.metrics(evaluate.heldout("vectors", X, y, groups, N, 4), y, LABELS[:4])["top1"]
    assert lda > vec


def test_tfidf_baseline_learns_words_and_scores_unseen_classes_low():
    texts = ["the storm broke the window"] * 6 + ["a cake for the party"] * 6
    y = np.array([0] * 6 + [1] * 6)
    score = evaluate.tfidf_model(texts, y, 3)
    s = score(["window storm", "party cake"])
    assert s.argmax(1).tolist() == [0, 1] and (s[:, 2] == -1e4).all()


def test_tfidf_baseline_learns_many_classes_from_few_texts():
    """171 classes x 6 texts of 100 words, one cue word each (a corpus subset's shape):
    the cue must be learnt (with an early-stopping tolerance the solver took no step
    and scored every class alike)."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    texts = [" ".join(list(rng.choice(vocab, 100)) + [f"cue{c}x"]) for c in range(171) for _ in range(6)]
    y = np.repeat(np.arange(171), 6)
    s = evaluate.tfidf_model(texts, y, 171)(texts)
    assert evaluate.metrics(s, y, LABELS)["top1"] > 0.9

"""Build a probe bank from a story corpus: read activations, sweep layers on held-out
topics, fit vectors and a probe at the chosen layer, validate, save.

Everything the validation table prints is written to ``report/validation.json`` first.
"""
from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.cluster import KMeans
from sklearn.model_selection import GroupKFold

from . import corpus as corpus_mod
from .bank import ProbeBank
from .capture import default_read_layer, measure_residual_norms, pooled_states
from .models import cache_dir, fingerprint
from .vectors import EmotionProbe, emotion_vectors, neutral_components, standardizer, topk_accuracy

TYLENOL = "I just took {x} mg of Tylenol for my back pain."
TYLENOL_DOSES = [250, 500, 1000, 2000, 4000, 8000, 16000]


def log(msg: str) -> None:
    print(f"[emoprobe] {msg}", file=sys.stderr, flush=True)


def select(rows: list[dict], stories_per_emotion: int | None) -> list[dict]:
    """All neutral rows and the first ``stories_per_emotion`` stories of each emotion."""
    if stories_per_emotion is None:
        return rows
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if r["kind"] == "story":
            if seen.get(r["emotion"], 0) >= stories_per_emotion:
                continue
            seen[r["emotion"]] = seen.get(r["emotion"], 0) + 1
        out.append(r)
    return out


def read_activations(model, tokenizer, texts: list[str], *, start: int, batch_size: int = 16,
                     max_tokens: int = 512) -> np.ndarray:
    """Mean-pooled activations [n, layers, hidden] of every layer. Cached per text on
    disk (safetensors, never pickle) by model fingerprint and pooling settings, so a
    larger corpus or a subset re-reads only what is new."""
    from safetensors.numpy import load_file, save_file

    fp = fingerprint(model, tokenizer)
    settings = hashlib.sha256(json.dumps([fp, start, max_tokens]).encode()).hexdigest()[:16]
    path = cache_dir() / "activations" / f"{fp['name'].replace('/', '_')}-{settings}.safetensors"
    store = load_file(str(path)) if path.exists() else {}
    keys = [hashlib.sha256(t.encode()).hexdigest()[:24] for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in store}.items())
    if len(todo) < len(texts):
        log(f"{len(texts) - len(todo)} of {len(texts)} texts' activations from cache {path.name}")
    if todo:
        seqs = [tokenizer(t)["input_ids"][:max_tokens] for _, t in todo]
        acts = pooled_states(model, seqs, range(fp["layers"]), pad_id=tokenizer.pad_token_id or 0, how="mean",
                             start=start, batch_size=batch_size, progress="reading corpus")
        store.update({k: a for (k, _), a in zip(todo, acts)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(store, str(tmp))
        tmp.replace(path)
    return np.stack([store[k] for k in keys])


def heldout_vectors(X: np.ndarray, y: np.ndarray, groups: np.ndarray, N: np.ndarray, n_classes: int,
                    folds: int = 5) -> np.ndarray:
    """Out-of-fold vector scores [n, n_classes], training on other topics only."""
    scores = np.zeros((len(y), n_classes))
    for train, test in GroupKFold(folds).split(X, y, groups):
        mu, sd = standardizer(np.vstack([X[train], N]))
        Z = (X[train] - mu) / sd
        V = emotion_vectors(Z, y[train], n_classes, neutral_components((N - mu) / sd))
        centre = np.mean([Z[y[train] == c].mean(0) for c in np.unique(y[train])], 0)
        scores[test] = ((X[test] - mu) / sd - centre) @ V.T
    return scores


def heldout_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, folds: int = 5,
                  C: float = 0.1) -> np.ndarray:
    scores = np.full((len(y), n_classes), -np.inf)
    for train, test in GroupKFold(folds).split(X, y, groups):
        probe = EmotionProbe(C=C).fit(X[train], y[train])
        scores[np.ix_(test, probe.classes_)] = probe.decision_function(X[test])
    return scores


def cluster_scores(scores: np.ndarray, clusters: np.ndarray, k: int) -> np.ndarray:
    """Score of each cluster = best score among its emotions."""
    return np.stack([scores[:, clusters == c].max(1) for c in range(k)], 1)


def choose_layer(sweep: list[dict], n_stories: int) -> int:
    """The paper's layer (2/3 of depth) unless the sweep clearly beats it.

    Held-out top-1 over 171 classes is a few hits in a thousand, so a plain argmax picks
    noise: another layer wins only if its 3-layer-smoothed top-1 beats the paper layer's
    by two binomial standard errors."""
    top1 = np.array([s["top1"] for s in sweep])
    smooth = np.convolve(top1, np.ones(3) / 3, mode="same")
    smooth[[0, -1]] = top1[[0, -1]]
    paper, best = default_read_layer(len(sweep)), int(np.argmax(smooth))
    se = np.sqrt(max(smooth[paper] * (1 - smooth[paper]), 1e-12) / n_stories)
    return best if smooth[best] - smooth[paper] > 2 * se else paper


def fit_layer(X: np.ndarray, y: np.ndarray, N: np.ndarray, n_classes: int):
    """Standardizer, unit standardized-space directions and unit raw-space vectors."""
    mu, sd = standardizer(np.vstack([X, N]))
    V = emotion_vectors((X - mu) / sd, y, n_classes, neutral_components((N - mu) / sd))
    raw = V * sd
    raw /= np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    return mu, sd, V, raw


def build(out: str | Path, model_name: str = "smollm2-135m-instruct", corpus_path: str | Path | None = None,
          subset: str | int = "full", start: int = 8, layer: int | None = None, batch_size: int = 16,
          folds: int = 5, probe_C: float = 0.1, model=None, tokenizer=None, labels: list[str] | None = None) -> ProbeBank:
    """The whole bank build. Returns the saved bank; writes bank/ and report/ under ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    if model is None:
        from .models import load_model

        log(f"loading {model_name}")
        model, tokenizer = load_model(model_name)
    fp = fingerprint(model, tokenizer)
    corpus_path = Path(corpus_path) if corpus_path else corpus_mod.shipped_corpus()
    per_emotion = None if subset == "full" else int(subset)  # stories per emotion: the corpus' first rounds
    rows = select(corpus_mod.load_corpus(corpus_path), per_emotion)
    labels = labels or corpus_mod.emotions()
    stories = [r for r in rows if r["kind"] == "story" and r["emotion"] in labels]
    neutral = [r for r in rows if r["kind"] == "neutral"]
    if len(neutral) < 10:
        raise ValueError(f"{corpus_path}: need at least 10 neutral dialogues for denoising, found {len(neutral)}")
    missing = sorted(set(labels) - {r["emotion"] for r in stories})
    if missing:
        raise ValueError(f"{corpus_path}: no stories for {len(missing)} emotions, e.g. {missing[:5]}")
    log(f"corpus {corpus_path.name}: {len(stories)} stories, {len(neutral)} neutral dialogues (subset={subset})")

    acts = read_activations(model, tokenizer, [r["text"] for r in stories + neutral], start=start,
                            batch_size=batch_size)
    t_read = time.perf_counter() - t0
    S, N = acts[:len(stories)].astype(np.float64), acts[len(stories):].astype(np.float64)
    y = np.array([labels.index(r["emotion"]) for r in stories])
    topic_ids = {t: i for i, t in enumerate(sorted({r["topic"] for r in stories}))}
    groups = np.array([topic_ids[r["topic"]] for r in stories])
    n, L = len(labels), fp["layers"]

    log("layer sweep (held-out topics)")
    sweep = []
    for k in range(L):
        sc = heldout_vectors(S[:, k], y, groups, N[:, k], n, folds)
        sweep.append({"layer": k, "top1": topk_accuracy(sc, y, 1), "top5": topk_accuracy(sc, y, 5)})
    chosen = int(layer) if layer is not None else choose_layer(sweep, len(y))

    log(f"fitting vectors at every layer and the probe at layer {chosen}")
    layer_vectors = np.zeros((L, n, fp["hidden_size"]), np.float32)
    for k in range(L):
        mu_k, sd_k, V_k, raw_k = fit_layer(S[:, k], y, N[:, k], n)
        layer_vectors[k] = raw_k
        if k == chosen:
            mu, sd, V = mu_k, sd_k, V_k
    X = S[:, chosen]
    vec_scores = heldout_vectors(X, y, groups, N[:, chosen], n, folds)
    probe_scores = heldout_probe(X, y, groups, n, folds, probe_C)
    probe = EmotionProbe(C=probe_C).fit(X, y)
    coef = np.zeros((n, X.shape[1]))
    icpt = np.full(n, -1e4)
    coef[probe.classes_], icpt[probe.classes_] = probe.coef_, probe.intercept_

    metrics = {m: {"heldout_top1": topk_accuracy(s, y, 1), "heldout_top5": topk_accuracy(s, y, 5)}
               for m, s in (("vectors", vec_scores), ("probe", probe_scores))}
    readout = "probe" if metrics["probe"]["heldout_top1"] > metrics["vectors"]["heldout_top1"] else "vectors"

    tensors = {"vectors": layer_vectors[chosen], "directions": V, "dim_mean": mu, "dim_scale": sd,
               "probe_coef": coef, "probe_intercept": icpt, "score_mean": np.zeros(n), "score_std": np.ones(n),
               "layer_vectors": layer_vectors,
               "residual_norm": measure_residual_norms(model, tokenizer)}  # steering's unit, per layer
    bank = ProbeBank(labels, chosen, fp, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, readout)
    # Until calibration replaces it: z-scores against the corpus' neutral dialogues.
    W, b = bank.raw_head()
    neutral_scores = N[:, chosen] @ W.T + b
    bank.tensors["score_mean"] = neutral_scores.mean(0).astype(np.float32)
    bank.tensors["score_std"] = (neutral_scores.std(0) + 1e-6).astype(np.float32)

    from sklearn.decomposition import PCA

    pca = PCA(2).fit(V)  # the paper's affect axes: PC1 ~ valence, PC2 ~ arousal
    pcs = pca.transform(V)
    affect = json.loads(corpus_mod.DATA.joinpath("affect.json").read_text())["ratings"]
    valence = np.array([affect.get(e, {}).get("valence", 0) for e in labels])
    arousal = np.array([affect.get(e, {}).get("arousal", 0) for e in labels])
    n_clusters = min(10, n)
    clusters = KMeans(n_clusters, n_init=10, random_state=0).fit_predict(V)
    chosen_scores = probe_scores if readout == "probe" else vec_scores
    cs = cluster_scores(chosen_scores, clusters, n_clusters)
    cy = clusters[y]
    sims = V @ V.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = {e: [labels[j] for j in np.argsort(-sims[i])[:5]] for i, e in enumerate(labels)}

    from .reader import TorchReader

    reader = TorchReader(model, tokenizer, bank)
    dose = reader.read_chat([TYLENOL.format(x=x) for x in TYLENOL_DOSES], at="reply")
    pos = np.arange(len(TYLENOL_DOSES))
    tylenol = {e: {"readout": dose[:, bank.index(e)].round(4).tolist(),
                   "spearman": float(spearmanr(pos, dose[:, bank.index(e)]).statistic)}
               for e in ("afraid", "calm") if e in labels}

    counts = np.bincount(y, minlength=n)
    stats_file = corpus_path.with_name(corpus_path.name.replace(".jsonl.gz", ".stats.json"))
    corpus_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    report = {
        "model": fp, "layer": chosen, "layer_fraction": round(chosen / (L - 1), 3), "paper_layer": default_read_layer(L),
        "layer_rule": "given" if layer is not None else "paper layer unless the sweep beats it by 2 standard errors",
        "readout": readout, **metrics[readout],
        "vectors": metrics["vectors"], "probe": metrics["probe"], "chance_top1": 1 / n,
        "clusters": {"k": n_clusters, "heldout_top1": topk_accuracy(cs, cy, 1), "heldout_top5": topk_accuracy(cs, cy, 5),
                     "members": {int(c): [labels[i] for i in np.where(clusters == c)[0]] for c in range(n_clusters)}},
        "pca": {"explained_variance": pca.explained_variance_ratio_.round(4).tolist(),
                "pc1_valence_r": float(abs(pearsonr(pcs[:, 0], valence).statistic)),
                "pc2_arousal_r": float(abs(pearsonr(pcs[:, 1], arousal).statistic)),
                "pc1_arousal_r": float(abs(pearsonr(pcs[:, 0], arousal).statistic)),
                "coords": {e: pcs[i].round(4).tolist() for i, e in enumerate(labels)},
                "ratings": "probes/data/affect.json (our coarse ratings, not the paper's human ratings)"},
        "neighbours": neighbours, "tylenol": {"template": TYLENOL, "doses": TYLENOL_DOSES, **tylenol},
        "layer_sweep": sweep,
        "corpus": {"path": str(corpus_path), "subset": subset, "stories": len(stories), "neutral": len(neutral),
                   "stories_per_emotion": {"min": int(counts.min()), "median": float(np.median(counts)),
                                           "max": int(counts.max())},
                   "topics": len(topic_ids), "hash": corpus_mod.corpus_hash(stories + neutral),
                   "leak_rate": corpus_stats.get("leak_rate"), "writer": corpus_stats.get("writer")},
        "settings": {"start": start, "folds": folds, "probe_C": probe_C, "pool": "mean"},
        "timing_s": {"read_activations": round(t_read, 1), "total": round(time.perf_counter() - t0, 1)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    bank.meta = {"build": {k: report[k] for k in ("readout", "heldout_top1", "heldout_top5", "corpus", "settings")}}
    bank.save(out / "bank")
    write_report(out / "report", report)
    return bank


def write_report(directory: Path, report: dict) -> None:
    """validation.json plus the plots, all drawn from the JSON's own numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "validation.json").write_text(json.dumps(report, indent=1))

    fig, ax = plt.subplots(figsize=(7, 4))
    sw = report["layer_sweep"]
    ax.plot([s["layer"] for s in sw], [s["top1"] for s in sw], label="top-1")
    ax.plot([s["layer"] for s in sw], [s["top5"] for s in sw], label="top-5")
    ax.axvline(report["layer"], color="k", ls="--", lw=1, label=f"read layer {report['layer']}")
    ax.axhline(report["chance_top1"], color="gray", ls=":", lw=1, label="chance (top-1)")
    ax.set(xlabel="layer", ylabel="held-out-topic accuracy", title="Emotion vectors: layer sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "layer_sweep.png", dpi=110)
    plt.close(fig)

    coords = report["pca"]["coords"]
    fig, ax = plt.subplots(figsize=(11, 9))
    xy = np.array(list(coords.values()))
    ax.scatter(xy[:, 0], xy[:, 1], s=6)
    for e, (x, y) in coords.items():
        ax.annotate(e, (x, y), fontsize=6)
    ev = report["pca"]["explained_variance"]
    ax.set(xlabel=f"PC1 ({ev[0]:.0%})", ylabel=f"PC2 ({ev[1]:.0%})", title="Emotion vectors: PC1-PC2")
    fig.tight_layout()
    fig.savefig(directory / "pca.png", dpi=110)
    plt.close(fig)

    ty = report["tylenol"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in [e for e in ("afraid", "calm") if e in ty]:
        ax.plot(ty["doses"], ty[e]["readout"], marker="o", label=f"{e} (rho={ty[e]['spearman']:.2f})")
    ax.set(xscale="log", xlabel="Tylenol dose (mg)", ylabel="z-score at reply token", title="Dose sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "tylenol.png", dpi=110)
    plt.close(fig)


def summary_table(report: dict) -> str:
    """The short table ``emoprobe build`` prints."""
    v, p, c = report["vectors"], report["probe"], report["clusters"]
    ty = report["tylenol"]
    rows = [
        ("model", f"{report['model']['name']} ({report['model']['layers']} layers, d={report['model']['hidden_size']})"),
        ("corpus", f"{report['corpus']['stories']} stories, {report['corpus']['neutral']} neutral, subset={report['corpus']['subset']}"),
        ("read layer", f"{report['layer']} ({report['layer_fraction']:.0%} of depth; paper's 2/3 = {report['paper_layer']})"),
        ("vectors held-out top-1/top-5", f"{v['heldout_top1']:.3f} / {v['heldout_top5']:.3f}  (chance {report['chance_top1']:.3f})"),
        ("probe held-out top-1/top-5", f"{p['heldout_top1']:.3f} / {p['heldout_top5']:.3f}"),
        ("bank readout", report["readout"]),
        ("10 clusters top-1/top-5", f"{c['heldout_top1']:.3f} / {c['heldout_top5']:.3f}"),
        ("PC1/PC2 variance", " / ".join(f"{x:.1%}" for x in report["pca"]["explained_variance"])),
        ("|r| PC1~valence, PC2~arousal", f"{report['pca']['pc1_valence_r']:.2f}, {report['pca']['pc2_arousal_r']:.2f}"),
        ("Tylenol rho afraid / calm", " / ".join(f"{ty[e]['spearman']:+.2f}" if e in ty else "n/a" for e in ("afraid", "calm"))),
        ("build time, peak RSS", f"{report['timing_s']['total']:.0f} s, {report['peak_rss_mb']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows)

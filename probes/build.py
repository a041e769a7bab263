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

from . import corpus as corpus_mod
from . import evaluate
from .bank import ProbeBank
from .capture import check_layer, default_read_layer, max_context, measure_residual_norms, pooled_states, token_states
from .models import cache_dir, fingerprint
from .vectors import topk_accuracy

TYLENOL = "I just took {x} mg of Tylenol for my back pain."
TYLENOL_DOSES = [250, 500, 1000, 2000, 4000, 8000, 16000]


def log(msg: str) -> None:
    print(f"[emoprobe] {msg}", file=sys.stderr, flush=True)


def select(rows: list[dict], per_emotion: int | None) -> list[dict]:
    """All neutral rows and the first ``per_emotion`` stories and messages of each emotion."""
    if per_emotion is None:
        return rows
    seen: dict[tuple[str, str], int] = {}
    out = []
    for r in rows:
        if r["kind"] != "neutral":
            key = (r["kind"], r["emotion"])
            if seen.get(key, 0) >= per_emotion:
                continue
            seen[key] = seen.get(key, 0) + 1
        out.append(r)
    return out


def read_activations(model, tokenizer, texts: list[str], *, start: int, batch_size: int = 16,
                     max_tokens: int = 512) -> np.ndarray:
    """Mean-pooled activations [n, layers, hidden] of every layer. Cached per text on
    disk (safetensors, never pickle) by model fingerprint and pooling settings, so a
    larger corpus or a subset re-reads only what is new."""
    from safetensors.numpy import load_file, save_file

    fp = fingerprint(model, tokenizer)
    dtype = str(next(model.parameters()).dtype)  # a bfloat16 read is cached apart from a float32 one
    settings = hashlib.sha256(json.dumps([fp, start, max_tokens] + ([dtype] if dtype != "torch.float32" else []))
                              .encode()).hexdigest()[:16]
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


def choose_layer(sweep: list[dict], n_stories: int) -> int:
    """The paper's layer (2/3 of depth) unless the sweep clearly beats it.

    Held-out top-1 over 171 classes is noisy, so a plain argmax can pick noise: another
    layer wins only if its 3-layer-smoothed top-1 beats the paper layer's by two
    binomial standard errors."""
    top1 = np.array([s["top1"] for s in sweep])
    smooth = np.convolve(top1, np.ones(3) / 3, mode="same")
    smooth[[0, -1]] = top1[[0, -1]]
    paper, best = default_read_layer(len(sweep)), int(np.argmax(smooth))
    se = np.sqrt(max(smooth[paper] * (1 - smooth[paper]), 1e-12) / n_stories)
    return best if smooth[best] - smooth[paper] > 2 * se else paper


def fit_layer(X: np.ndarray, y: np.ndarray, N: np.ndarray, n_classes: int):
    """Standardizer, unit standardized-space directions and unit raw-space vectors."""
    mu, sd, V = evaluate.vector_fit(X, y, N, n_classes)
    raw = V * sd
    raw /= np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    return mu, sd, V, raw


def token_pool(hs: list, start: int) -> np.ndarray:
    """Mean of each text's per-token states from ``start`` on, scaled down for short
    texts as ``capture.pool`` does (never past half the text); token 0 is always left out
    when the text has more than one token (the attention sink)."""
    out = []
    for h in hs:
        h = np.asarray(h, np.float64)
        s = min(start, len(h) // 2)
        out.append(h[max(s, 1 if len(h) > 1 else 0):].mean(0))
    return np.stack(out)


CHAT_POSITIONS = ("reply", "last_user", "mean_user")  # where a user turn can be read


def read_turns(model, tokenizer, texts: list[str], layers: list[int], batch_size: int) -> dict[str, np.ndarray]:
    """One-turn chats read once, at every position a user turn offers: the token that
    opens the assistant's reply (the paper's), the user's last token, and the mean over
    the user's tokens. {position: states [n, len(layers), d]}."""
    from .tokens import encode_chat

    enc = [encode_chat(tokenizer, [{"role": "user", "content": t}], generation_prompt=True) for t in texts]
    hs = token_states(model, [e[1] for e in enc], list(layers), pad_id=tokenizer.pad_token_id or 0,
                      batch_size=batch_size, max_len=max_context(model, tokenizer))
    user = [e[3][0] for e in enc]
    return {"reply": np.stack([h[-1].numpy() for h in hs]).astype(np.float64),
            "last_user": np.stack([h[u[-1]].numpy() for h, u in zip(hs, user)]).astype(np.float64),
            "mean_user": np.stack([h[u].numpy().mean(0) for h, u in zip(hs, user)]).astype(np.float64)}


def read_messages(model, tokenizer, texts: list[str], layers: list[int], batch_size: int) -> list[list[np.ndarray]]:
    """Per-token states of short texts at each layer, read in one pass: [layer][text] -> [tokens, d]."""
    hs = token_states(model, [tokenizer(t)["input_ids"] for t in texts], list(layers),
                      pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size, max_len=max_context(model, tokenizer))
    return [[h[:, j].numpy() for h in hs] for j in range(len(layers))]


def build(out: str | Path, model_name: str = "smollm2-135m-instruct", corpus_path: str | Path | None = None,
          subset: str | int = "full", start: int = 8, layer: int | None = None, batch_size: int = 16,
          folds: int = 5, probe_C: float = 0.1, model=None, tokenizer=None, labels: list[str] | None = None,
          readers: tuple[str, ...] = ("vectors", "lda", "probe"), message_starts: tuple[int, ...] = (1, 2, 4, 8),
          eval_sets: bool = True) -> ProbeBank:
    """The whole bank build. Returns the saved bank; writes bank/ and report/ under ``out``.

    Everything chosen (layer, reader, the pooling start of short texts) is chosen on the
    corpus, by held-out topics; the held-out evaluation sets are only scored, once."""
    t0 = time.perf_counter()
    out = Path(out)
    if model is None:
        from .models import load_model

        log(f"loading {model_name}")
        model, tokenizer = load_model(model_name)
    fp = fingerprint(model, tokenizer)
    corpus_path = Path(corpus_path) if corpus_path else corpus_mod.shipped_corpus()
    per_emotion = None if subset == "full" else int(subset)  # stories per emotion: the corpus' first rows
    rows = select(corpus_mod.load_corpus(corpus_path), per_emotion)
    labels = labels or corpus_mod.emotions()
    stories = [r for r in rows if r["kind"] == "story" and r["emotion"] in labels]
    messages = [r for r in rows if r["kind"] == "message" and r["emotion"] in labels]
    neutral = [r for r in rows if r["kind"] == "neutral"]
    if len(neutral) < 10:
        raise ValueError(f"{corpus_path}: need at least 10 neutral dialogues for denoising, found {len(neutral)}")
    missing = sorted(set(labels) - {r["emotion"] for r in stories})
    if missing:
        raise ValueError(f"{corpus_path}: no stories for {len(missing)} emotions, e.g. {missing[:5]}")
    log(f"corpus {corpus_path.name}: {len(stories)} stories, {len(messages)} messages, "
        f"{len(neutral)} neutral dialogues (subset={subset})")

    acts = read_activations(model, tokenizer, [r["text"] for r in stories + neutral], start=start,
                            batch_size=batch_size)
    t_read = time.perf_counter() - t0
    S, N = acts[:len(stories)].astype(np.float64), acts[len(stories):].astype(np.float64)
    del acts
    y = np.array([labels.index(r["emotion"]) for r in stories])
    topic_ids = {t: i for i, t in enumerate(sorted({r["topic"] for r in stories}))}
    groups = np.array([topic_ids[r["topic"]] for r in stories])
    n, L = len(labels), fp["layers"]
    folds = min(folds, len(topic_ids))

    log("layer sweep (held-out topics)")
    sweep = []
    for k in range(L):
        sc = evaluate.heldout("vectors", S[:, k], y, groups, N[:, k], n, folds)
        sweep.append({"layer": k, "top1": topk_accuracy(sc, y, 1), "top5": topk_accuracy(sc, y, 5)})
    chosen = check_layer(model, int(layer)) if layer is not None else choose_layer(sweep, len(y))

    log(f"comparing readers at layer {chosen}, and the baselines on the same folds")
    X = S[:, chosen]
    heldout = {r: evaluate.heldout(r, X, y, groups, N[:, chosen], n, folds, probe_C) for r in readers}
    reader_metrics = {r: evaluate.metrics(sc, y, labels) for r, sc in heldout.items()}
    readout = max(readers, key=lambda r: (reader_metrics[r]["top1"], reader_metrics[r]["top5"]))
    texts = [r["text"] for r in stories]
    shuffled_y = np.random.default_rng(0).permutation(y)
    baselines = {
        "tfidf_words": evaluate.metrics(evaluate.heldout_tfidf(texts, y, groups, n, folds), y, labels),
        "layer0": evaluate.metrics(evaluate.heldout(readout, S[:, 0], y, groups, N[:, 0], n, folds, probe_C), y, labels),
        "shuffled_labels": evaluate.metrics(
            evaluate.heldout(readout, X, shuffled_y, groups, N[:, chosen], n, folds, probe_C), y, labels),
    }

    log("fitting vectors at every layer and the readout on all stories")
    layer_vectors = np.zeros((L, n, fp["hidden_size"]), np.float32)
    for k in range(L):
        mu_k, sd_k, V_k, raw_k = fit_layer(S[:, k], y, N[:, k], n)
        layer_vectors[k] = raw_k
        if k == chosen:
            mu, sd, V = mu_k, sd_k, V_k
    W_fit, b_fit = evaluate.fit_readout(readout, X, y, N[:, chosen], n, probe_C)  # the map the held-out folds scored
    trained = readout != "vectors"  # the vectors' map is rebuilt from directions; any per-class shift cancels in z
    tensors = {"vectors": layer_vectors[chosen], "directions": V, "dim_mean": mu, "dim_scale": sd,
               "probe_coef": W_fit if trained else np.zeros_like(W_fit),
               "probe_intercept": b_fit if trained else np.zeros_like(b_fit), "score_mean": np.zeros(n), "score_std": np.ones(n),
               "layer_vectors": layer_vectors,
               "residual_norm": measure_residual_norms(model, tokenizer)}  # steering's unit, per layer
    bank = ProbeBank(labels, chosen, fp, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, readout)
    # Until calibration replaces it: z-scores against the corpus' neutral dialogues.
    W_raw, b_raw = bank.raw_head()
    neutral_scores = N[:, chosen] @ W_raw.T + b_raw
    bank.tensors["score_mean"] = neutral_scores.mean(0).astype(np.float32)
    bank.tensors["score_std"] = (neutral_scores.std(0) + 1e-6).astype(np.float32)
    W_z, b_z = bank.head()
    W0, b0 = evaluate.fit_readout(readout, S[:, 0], y, N[:, 0], n, probe_C)
    words = evaluate.tfidf_model(texts, y, n)

    def transfer(X_chosen, X_0, new_texts, y_new) -> dict:
        """Texts outside the stories, scored by the readout fitted on all stories (the map
        the held-out folds scored), by the bank as shipped (z-scored per emotion against
        neutral text), and by the baselines."""
        return {"model": evaluate.metrics(X_chosen @ W_fit.T + b_fit, y_new, labels),
                "bank_z": evaluate.metrics(X_chosen @ W_z.T + b_z, y_new, labels),
                "tfidf_words": evaluate.metrics(words(new_texts), y_new, labels),
                "layer0": evaluate.metrics(X_0 @ W0.T + b0, y_new, labels)}

    turns = {"chosen": "reply", "by_position": {},
             "rule": "highest top-1 on the corpus' user messages read as one-turn chats (training side)"}
    user_msgs = [r for r in messages if r.get("person") == "user"]
    if user_msgs:
        log(f"read position for user turns, on the corpus' {len(user_msgs)} user messages")
        yu = np.array([labels.index(r["emotion"]) for r in user_msgs])
        at = read_turns(model, tokenizer, [r["text"] for r in user_msgs], [chosen], batch_size)
        turns["by_position"] = {p: evaluate.metrics(at[p][:, 0] @ W_fit.T + b_fit, yu, labels) for p in CHAT_POSITIONS}
        turns["chosen"] = max(CHAT_POSITIONS, key=lambda p: turns["by_position"][p]["top1"])
    short = {"best_start": None, "by_start": {}, "readers_pool_from": 1}
    if messages:
        log(f"pooling start for short texts, on the corpus' {len(messages)} messages")
        ym = np.array([labels.index(r["emotion"]) for r in messages])
        hs = read_messages(model, tokenizer, [r["text"] for r in messages], [chosen], batch_size)[0]
        short["by_start"] = {s: evaluate.metrics(token_pool(hs, s) @ W_fit.T + b_fit, ym, labels)
                             for s in message_starts}
        short["best_start"] = max(message_starts, key=lambda s: (short["by_start"][s]["top1"], -s))
    evaluation = {}
    if eval_sets:
        log("scoring the held-out evaluation sets (once; nothing is chosen on them)")
        from .handwritten import eval_rows

        ev = [r for r in eval_rows() if r["emotion"] in labels]
        implicit = [r for r in ev if r["kind"] == "implicit"]
        held = [r for r in ev if r["kind"] == "message"]
        if implicit:
            T = read_turns(model, tokenizer, [r["text"] for r in implicit], [chosen, 0], batch_size)
            yi = np.array([labels.index(r["emotion"]) for r in implicit])
            for p in dict.fromkeys(["reply", turns["chosen"]]):  # the paper's position, and the one chosen above
                evaluation[f"implicit_{p}"] = transfer(T[p][:, 0], T[p][:, 1], [r["text"] for r in implicit], yi)
        if held:
            hs = read_messages(model, tokenizer, [r["text"] for r in held], [chosen, 0], batch_size)
            evaluation["heldout_messages"] = transfer(  # pooled as every reader pools: all but token 0
                token_pool(hs[0], 1), token_pool(hs[1], 1), [r["text"] for r in held],
                np.array([labels.index(r["emotion"]) for r in held]))

    from sklearn.decomposition import PCA

    pca = PCA(2).fit(V)  # the paper's affect axes: PC1 ~ valence, PC2 ~ arousal
    pcs = pca.transform(V)
    affect = json.loads(corpus_mod.DATA.joinpath("affect.json").read_text())["ratings"]
    rated = [i for i, e in enumerate(labels) if e in affect]
    valence = np.array([affect[labels[i]]["valence"] for i in rated])
    arousal = np.array([affect[labels[i]]["arousal"] for i in rated])
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

    def r_abs(a, b):
        return float(abs(pearsonr(a, b).statistic)) if len(a) > 2 and np.std(a) > 0 else None

    counts = np.bincount(y, minlength=n)
    report = {
        "model": fp, "layer": chosen, "layer_fraction": round(chosen / max(L - 1, 1), 3),
        "paper_layer": default_read_layer(L),
        "layer_rule": "given" if layer is not None else "paper layer unless the sweep beats it by 2 standard errors",
        "readout": readout, "readout_rule": "highest held-out-topic top-1 (then top-5) among the readers",
        "heldout_top1": reader_metrics[readout]["top1"], "heldout_top5": reader_metrics[readout]["top5"],
        "readers": reader_metrics, "baselines": baselines, "chance": evaluate.chance(labels),
        "chance_top1": 1 / n, "short_texts": short, "user_turns": turns, "evaluation": evaluation,
        "pca": {"explained_variance": pca.explained_variance_ratio_.round(4).tolist(),
                "pc1_valence_r": r_abs(pcs[rated, 0], valence), "pc2_arousal_r": r_abs(pcs[rated, 1], arousal),
                "pc1_arousal_r": r_abs(pcs[rated, 0], arousal), "rated": len(rated),
                "coords": {e: pcs[i].round(4).tolist() for i, e in enumerate(labels)},
                "ratings": "probes/data/affect.json (one rater who saw only the 171 words)"},
        "neighbours": neighbours, "tylenol": {"template": TYLENOL, "doses": TYLENOL_DOSES, **tylenol},
        "layer_sweep": sweep,
        "corpus": {"path": str(corpus_path), "subset": subset, "stories": len(stories), "messages": len(messages),
                   "neutral": len(neutral),
                   "stories_per_emotion": {"min": int(counts.min()), "median": float(np.median(counts)),
                                           "max": int(counts.max())},
                   "topics": len(topic_ids), "hash": corpus_mod.corpus_hash(stories + neutral)},
        "settings": {"start": start, "folds": folds, "probe_C": probe_C, "pool": "mean", "readers": list(readers)},
        "timing_s": {"read_activations": round(t_read, 1), "total": round(time.perf_counter() - t0, 1)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    bank.meta = {"build": {**{k: report[k] for k in ("readout", "heldout_top1", "heldout_top5", "corpus", "settings")},
                            "user_turn_position": turns["chosen"]}}
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
    """The short table ``emoprobe build`` prints: the readout beside its baselines."""
    def fmt(m: dict) -> str:
        head = f"  12: {m['headline_top1']:.2f}" if "headline_top1" in m else ""
        return (f"top-1 {m['top1']:.3f}  top-5 {m['top5']:.3f}  family {m['family_top1']:.2f}  "
                f"rank {m['mean_rank']:.1f}{head}")

    r, ch, ty = report["readers"][report["readout"]], report["chance"], report["tylenol"]
    rows = [
        ("model", f"{report['model']['name']} ({report['model']['layers']} layers, d={report['model']['hidden_size']})"),
        ("corpus", f"{report['corpus']['stories']} stories, {report['corpus']['neutral']} neutral, subset={report['corpus']['subset']}"),
        ("read layer", f"{report['layer']} ({report['layer_fraction']:.0%} of depth; paper's 2/3 = {report['paper_layer']})"),
        (f"readout ({report['readout']}), held-out topics", fmt(r)),
    ]
    rows += [(f"  reader {k}", fmt(m)) for k, m in report["readers"].items() if k != report["readout"]]
    rows += [(f"  baseline {k}", fmt(m)) for k, m in report["baselines"].items()]
    rows.append(("  chance", f"top-1 {ch['top1']:.3f}  top-5 {ch['top5']:.3f}  family {ch['family_top1']:.2f}  "
                             f"rank {ch['mean_rank']:.1f}  12: {ch['headline_top1']:.2f}"))
    for name, ev in report["evaluation"].items():
        rows.append((f"eval {name}", fmt(ev["model"])))
        rows += [(f"  {'bank as shipped (z)' if k == 'bank_z' else 'baseline ' + k}", fmt(m))
                 for k, m in ev.items() if k != "model"]
    pca = report["pca"]
    rows += [
        ("PC1/PC2 variance", " / ".join(f"{x:.1%}" for x in pca["explained_variance"])),
        ("|r| PC1~valence, PC2~arousal",
         ", ".join("n/a" if v is None else f"{v:.2f}" for v in (pca["pc1_valence_r"], pca["pc2_arousal_r"]))),
        ("Tylenol rho afraid / calm", " / ".join(f"{ty[e]['spearman']:+.2f}" if e in ty else "n/a" for e in ("afraid", "calm"))),
        ("build time, peak RSS", f"{report['timing_s']['total']:.0f} s, {report['peak_rss_mb']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows)

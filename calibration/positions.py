"""Where a user turn is read: every position the chat template offers, at every layer.

A one-turn chat ends ``... user text | template tokens | reply-opening token``. The
positions are the user's last token (``user``), the mean over the user's tokens
(``user_mean``), each template token after the user's text (``reply-K``: K tokens
before the reply-opening one) and the reply-opening token itself (``reply``, the
paper's). ``sweep`` reads every prompt once, at all layers, and keeps per position the
bank's readout at its read layer and the paper's per-layer vectors (afraid and calm)
everywhere, so choosing a position costs one pass.
"""
from __future__ import annotations

import numpy as np

from probes.tokens import check_position, encode_turn, read_position as pick


def check_at(at: str) -> None:
    if at != "auto":
        check_position(at)


def template_gap(ids: list[int], user: list[int]) -> int:
    """Template tokens strictly between the user's last token and the reply-opening one."""
    return len(ids) - 1 - user[-1] - 1


def position_names(gap: int) -> list[str]:
    """All positions, in reading order, for chats with at least ``gap`` template tokens."""
    return ["user_mean", "user", *[f"reply-{k}" for k in range(gap, 0, -1)], "reply"]


def sweep(model, tokenizer, bank, texts: list[str], batch_size: int = 16, chunk: int = 32, bar=None) -> dict:
    """Read each one-turn chat once at all layers.

    Returns ``positions`` (names), ``bank`` [texts, P, n] (raw bank readout at its layer),
    ``layers`` [texts, P, L, 2] (raw projections on the per-layer afraid and calm vectors)
    and ``tokens`` (the template tokens' text, for the plot)."""
    import torch

    from probes.capture import token_states

    enc = [encode_turn(tokenizer, t) for t in texts]
    gap = min(template_gap(ids, user) for ids, user in enc) if enc else 0
    names = position_names(gap)
    W, b = bank.raw_head()
    lv = bank.tensors["layer_vectors"][:, [bank.index("afraid"), bank.index("calm")]]  # [L, 2, d]
    L = lv.shape[0]
    out_bank = np.zeros((len(texts), len(names), len(bank.labels)), np.float32)
    out_layers = np.zeros((len(texts), len(names), L, 2), np.float32)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    for i in range(0, len(enc), chunk):
        part = enc[i:i + chunk]
        with torch.no_grad():
            states = token_states(model, [e[0] for e in part], list(range(L)), pad_id=pad, batch_size=batch_size)
        for j, (h, (_, user)) in enumerate(zip(states, part)):
            h = h.numpy()  # [tokens, L, d]
            at = np.stack([pick(h, p, user) for p in names])  # [P, L, d]
            out_bank[i + j] = at[:, bank.layer] @ W.T + b
            out_layers[i + j] = np.einsum("pld,lkd->plk", at, lv)
        if bar is not None:
            bar.update(len(part))
    toks = []
    if enc:
        ids, user = enc[0]
        toks = [tokenizer.decode([t]) for t in ids[user[-1] + 1:]]
    return {"positions": names, "bank": out_bank, "layers": out_layers, "tokens": toks}


# -- choosing a position: the training side only -------------------------------------------
def standardize(raw: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """z against ordinary prompts read at the same position (and layer): raw [items, ...]."""
    return (raw - neutral.mean(0)) / (neutral.std(0) + 1e-6)


def danger_score(z_afraid: np.ndarray, z_calm: np.ndarray) -> np.ndarray:
    """The paper's fixed readout of danger, nothing fitted: afraid up, calm down."""
    return z_afraid - z_calm


def choose(scores: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, default: str = "reply",
           n_boot: int = 1000) -> dict:
    """The rule: the position with the highest training-side AUROC of afraid - calm
    (dangerous prompts against safe ones, controls and safe pair members included, so a
    readout of number size scores badly) replaces ``default`` (the paper's reply token)
    only if it beats it by more than two bootstrap standard errors of the difference,
    resampling whole families and pair domains. Returns per-position AUROCs and the pick."""
    from . import stats

    auc = {p: stats.auroc(s, y) for p, s in scores.items()}
    best = max(auc, key=lambda p: np.nan_to_num(auc[p], nan=-1))
    diffs = stats.group_resamples(lambda i: stats.auroc(scores[best][i], y[i]) - stats.auroc(scores[default][i], y[i]),
                                  groups, n_boot) if best != default else np.zeros(0)
    se = float(np.std(diffs)) if len(diffs) else 0.0
    chosen = best if best != default and auc[best] - auc[default] > 2 * se else default
    return {"auroc": {p: round(float(a), 4) for p, a in auc.items()}, "best": best, "default": default,
            "diff_se": round(se, 4), "chosen": chosen,
            "rule": f"highest training-side AUROC of afraid - calm; replaces {default!r} only when ahead by more "
                    "than 2 bootstrap SE (families and pair domains resampled)"}


def plot_sweep(doc: dict, path) -> None:
    """Training-side AUROC of afraid - calm per layer (the paper's per-layer vectors), one
    line per position; the bank's own readout at its read layer as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for p, curve in doc["layers"].items():
        line, = ax.plot(range(len(curve)), curve, marker="o", ms=2.5, lw=1.2, label=f"{p} ({doc['token'].get(p, '')})")
        if p in doc["bank"]["auroc"]:
            ax.plot([doc["layer"]], [doc["bank"]["auroc"][p]], marker="*", ms=11, color=line.get_color())
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.axvline(doc["layer"], color="k", ls="--", lw=0.8)
    ax.set(xlabel="layer (per-layer emotion vectors); * = the bank's readout at its read layer",
           ylabel="AUROC, afraid - calm (training side)", ylim=(0, 1),
           title=f"{doc['model']}: read position sweep on {doc['items']} training-side prompts\n"
                 f"chosen: {doc['bank']['chosen']} (rule: beat the reply token by > 2 SE)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

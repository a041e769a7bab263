"""Readers turn texts into per-token emotion scores with a probe bank.

``BaseReader`` holds everything but the forward pass, so the torch reader here and
the onnxruntime reader in ``exporters`` share tokenization, chat positions and pooling.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .bank import ProbeBank
from .tokens import chat_read_positions

POOLS = ("mean", "last", "max")


def pool_scores(scores: np.ndarray, how: str) -> np.ndarray:
    """Pool per-token scores [tokens, n] into [n]. The first token is left out when others
    exist: it is the attention sink (or BOS), whose residual norm dwarfs the rest, and its
    readout (tens of z) would swamp the pool."""
    scores = scores[1:] if len(scores) > 1 else scores
    if how == "mean":
        return scores.mean(0)
    if how == "last":
        return scores[-1]
    if how == "max":
        return scores.max(0)
    raise ValueError(f"pool must be one of {POOLS}, got {how!r}")


class BaseReader:
    bank: ProbeBank
    tokenizer: object
    max_len: int = 2048

    @property
    def labels(self) -> list[str]:
        return self.bank.labels

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token scores [tokens, n_emotions] for each token-id sequence."""
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        seqs = [self.tokenizer(t)["input_ids"] for t in texts]
        for t, s in zip(texts, seqs):
            if not s:
                raise ValueError(f"text {t!r} has no tokens")
        return seqs

    def read_tokens(self, texts: Sequence[str]) -> list[tuple[list[str], np.ndarray]]:
        """For each text, its tokens (as text, not BPE symbols) and their scores [tokens, n_emotions]."""
        seqs = self.encode(texts)
        return [([self.tokenizer.decode([i]) for i in s], sc) for s, sc in zip(seqs, self.score_ids(seqs))]

    def read(self, texts: Sequence[str], pool: str = "mean") -> np.ndarray:
        """Pooled scores [n_texts, n_emotions]."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        return np.stack([pool_scores(s, pool) for s in self.score_ids(self.encode(texts))])

    def read_chat(self, user_texts: Sequence[str], at: str = "reply", system: str | None = None) -> np.ndarray:
        """Scores [n, n_emotions] of one-turn chats, read at the token that opens the
        assistant's reply (``at="reply"``, the paper's position) or at the user's last token."""
        if at not in ("reply", "user"):
            raise ValueError(f"at must be 'reply' or 'user', got {at!r}")
        parsed = [chat_read_positions(self.tokenizer, t, system) for t in user_texts]
        scores = self.score_ids([p[0] for p in parsed])
        return np.stack([s[p[1] if at == "reply" else p[2]] for s, p in zip(scores, parsed)])


class TorchReader(BaseReader):
    """Reads with the HF model in torch; stops the forward pass at the read layer."""

    def __init__(self, model, tokenizer, bank: ProbeBank, batch_size: int = 16):
        import torch

        from .capture import max_context
        from .models import check_fingerprint, fingerprint

        check_fingerprint(bank.model, fingerprint(model, tokenizer), what="probe bank")
        self.model, self.tokenizer, self.bank, self.batch_size = model, tokenizer, bank, batch_size
        self.max_len = max_context(model, tokenizer)
        W, b = bank.head()
        self._W, self._b = torch.from_numpy(W), torch.from_numpy(b)

    def score_ids(self, seqs):
        from .capture import token_states

        hs = token_states(self.model, seqs, self.bank.layer, pad_id=self.tokenizer.pad_token_id or 0,
                          batch_size=self.batch_size, max_len=self.max_len)
        return [(h @ self._W.T + self._b).numpy() for h in hs]

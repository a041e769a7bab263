"""Readers turn texts into per-token emotion scores with a probe bank.

``BaseReader`` holds everything but the forward pass, so the torch reader here and
the onnxruntime reader in ``exporters`` share tokenization, chat positions and pooling.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .bank import ProbeBank
from .tokens import POOLS, check_position, encode_chat, read_position, read_windowed




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
    """Everything but one padded forward pass: backends implement ``forward``."""

    bank: ProbeBank
    tokenizer: object
    max_len: int = 2048
    batch_size: int = 16
    overlap: int | None = None  # tokens shared by windows of a long text (None: the default)

    @property
    def labels(self) -> list[str]:
        return self.bank.labels

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of a right-padded batch [B, T]: at least {"scores": [B, T, n_emotions]}."""
        raise NotImplementedError

    def read_ids(self, seqs: Sequence[Sequence[int]], progress=None) -> list[dict[str, np.ndarray]]:
        """Every output of ``forward`` per sequence, long ones read in windows;
        ``progress(n)`` is told the tokens each forward batch finished."""
        return read_windowed(seqs, self.forward, self.max_len, batch_size=self.batch_size, overlap=self.overlap,
                             pad_id=getattr(self.tokenizer, "pad_token_id", None) or 0, progress=progress)

    def score_ids(self, seqs: Sequence[Sequence[int]], progress=None) -> list[np.ndarray]:
        """Per-token scores [tokens, n_emotions] for each token-id sequence."""
        return [r["scores"] for r in self.read_ids(seqs, progress)]

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
        assistant's reply (``at="reply"``, the paper's position), at the user's last token
        (``"user"``) or averaged over the user's tokens (``"user_mean"``: on the default
        model the position that carries the user's emotion, chosen on training data), or
        ``"reply-K"``: the template token K places before the reply-opening one (where a
        calibration may choose to read: ``bank.meta["calibration"]["position"]["at"]``)."""
        check_position(at)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ""}]
        enc = [encode_chat(self.tokenizer, msgs[:-1] + [{"role": "user", "content": t}], generation_prompt=True)
               for t in user_texts]
        scores = self.score_ids([e[1] for e in enc])
        return np.stack([read_position(s, at, e[3][-1]) for s, e in zip(scores, enc)])


class TorchReader(BaseReader):
    """Reads with the HF model in torch, on the model's device; stops the forward pass at
    the read layer."""

    def __init__(self, model, tokenizer, bank: ProbeBank, batch_size: int = 16):
        import torch

        from .capture import max_context, model_device
        from .models import check_fingerprint, fingerprint

        check_fingerprint(bank.model, fingerprint(model, tokenizer), what="probe bank")
        self.model, self.tokenizer, self.bank, self.batch_size = model, tokenizer, bank, batch_size
        self.max_len = max_context(model, tokenizer)
        W, b = bank.head()
        device = model_device(model)
        self._W, self._b = torch.from_numpy(W).to(device), torch.from_numpy(b).to(device)

    @property
    def spec(self) -> str:
        """What reads: the backend and the weights' dtype (a scan records it, so a resume
        cannot mix precisions)."""
        return f"torch:{str(next(self.model.parameters()).dtype).removeprefix('torch.')}"

    def forward(self, ids, mask):
        import torch

        from .capture import hidden_states

        h = hidden_states(self.model, torch.from_numpy(ids), torch.from_numpy(mask), [self.bank.layer])[self.bank.layer]
        return {"scores": (h.float() @ self._W.T + self._b).cpu().numpy()}

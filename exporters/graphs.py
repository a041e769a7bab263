"""The torch modules that get exported: the probe head alone, and the model's prefix
(embeddings + decoder blocks up to the read layer) followed by the head.

The prefix builds its own attention masks and position ids from ``attention_mask``
instead of calling the HF model's forward: the graph then holds no layer above the
read layer, no final norm, no LM head, and padding on either side is exact.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from calibration.run import RISK_TENSORS
from probes.bank import ProbeBank
from probes.architectures import attention_types, block_output, decoder_layers, rotary
from probes.capture import check_layer, position_ids


def has_risk(bank: ProbeBank) -> bool:
    """True when ``emoprobe calibrate`` stored a risk calibrator in the bank."""
    return all(k in bank.tensors for k in RISK_TENSORS)


class Head(nn.Module):
    """scores = h @ W.T + b (``bank.head()``); with a risk calibrator also
    risk = interp(scores @ risk_weight + risk_bias, risk_x, risk_y) as a sum of clipped
    ramps (``calibration.risk_from_scores`` is the reference)."""

    def __init__(self, bank: ProbeBank):
        super().__init__()
        W, b = bank.head()
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(W.T)))  # [D, n]
        self.register_buffer("bias", torch.from_numpy(b))
        self.risk = has_risk(bank)
        if self.risk:
            t = {k: np.asarray(bank.tensors[k], np.float64) for k in RISK_TENSORS}
            x, y = t["risk_x"], t["risk_y"]
            if x.ndim != 1 or len(x) < 2 or x.shape != y.shape or np.any(np.diff(x) <= 0):
                raise ValueError("bank risk tensors: risk_x must be strictly increasing and match risk_y")
            f32 = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
            self.register_buffer("risk_w", f32(t["risk_weight"].reshape(-1, 1)))
            self.register_buffer("risk_b", f32(t["risk_bias"].reshape(())))
            self.register_buffer("lo", f32(x[:-1]))
            self.register_buffer("hi", f32(x[1:]))
            self.register_buffer("slope", f32(np.diff(y) / np.diff(x)))
            self.register_buffer("y0", f32(y[0]))

    def forward(self, hidden):
        scores = torch.matmul(hidden, self.weight) + self.bias
        if not self.risk:
            return scores
        s = torch.matmul(scores, self.risk_w) + self.risk_b  # [B, T, 1]
        ramps = torch.minimum(torch.maximum(s, self.lo), self.hi) - self.lo
        return scores, self.y0 + (ramps * self.slope).sum(-1)


class Prefix(nn.Module):
    """input_ids, attention_mask [B, T] -> residual stream after block ``layer`` [B, T, D]."""

    def __init__(self, model, layer: int):
        super().__init__()
        layer = check_layer(model, layer)
        self.embed = model.get_input_embeddings()  # Gemma3's scales itself
        self.blocks = nn.ModuleList(list(decoder_layers(model))[:layer + 1])
        self.rotary, self.typed_rotary = rotary(model)
        types, self.window = attention_types(model)
        self.types = types[:layer + 1]

    def _mask(self, attention_mask, kind, dtype):
        """Additive mask [B, 1, T, T]: causal, real keys only, within the window for
        sliding layers. The diagonal is always open so a padding row is never fully
        masked (no NaN that could leak through 0 * NaN into real rows)."""
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        diff = idx[:, None] - idx[None, :]  # query - key
        allowed = (diff >= 0)[None] & attention_mask.bool()[:, None, :]
        if kind == "sliding_attention" and self.window:
            allowed = allowed & (diff < self.window)[None]
        allowed = allowed | (diff == 0)[None]
        zero = torch.zeros((), dtype=dtype)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]

    def forward(self, input_ids, attention_mask):
        pos = position_ids(attention_mask)
        h = self.embed(input_ids)
        masks, rope = {}, {}
        for kind in dict.fromkeys(self.types):
            masks[kind] = self._mask(attention_mask, kind, h.dtype)
            rope[kind] = self.rotary(h, pos, kind) if self.typed_rotary else self.rotary(h, pos)
        for block, kind in zip(self.blocks, self.types):
            h = block_output(block(h, attention_mask=masks[kind], position_embeddings=rope[kind], position_ids=pos))
        return h


class Monitor(nn.Module):
    """Prefix then head: input_ids, attention_mask -> scores (, risk)."""

    def __init__(self, model, bank: ProbeBank):
        super().__init__()
        self.prefix, self.head = Prefix(model, bank.layer), Head(bank)

    def forward(self, input_ids, attention_mask):
        return self.head(self.prefix(input_ids, attention_mask))

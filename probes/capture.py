"""Hidden-state capture: one naming of layers, padding that never changes a readout.

``layer k`` is the output of decoder block k (0-based) everywhere in emoprobe.
Capture uses forward hooks and stops the forward pass after the deepest layer asked
for, so the blocks above it and the LM head are never computed.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .architectures import block_output, decoder_layers, text_config
from .tokens import POOLS, read_windowed



def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if layer < 0:
        layer += n
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has {n} decoder blocks (0..{n - 1})")
    return layer


class _Stop(Exception):
    pass


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_device(model) -> torch.device:
    """Where the model's weights are: inputs go there, results come back to the CPU."""
    return next(model.parameters()).device


def default_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``: the default of every ``--device``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Residual stream after each requested block: {layer: [batch, tokens, hidden]}."""
    blocks = decoder_layers(model)
    layers = sorted({check_layer(model, k) for k in layers})
    out: dict[int, torch.Tensor] = {}
    deepest = layers[-1]

    def hook_for(k):
        def hook(_module, _inputs, output):
            out[k] = block_output(output).detach()
            if k == deepest:
                raise _Stop
        return hook

    handles = [blocks[k].register_forward_hook(hook_for(k)) for k in layers]
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    try:
        base = getattr(model, "model", model)  # skip the LM head: logits are never needed
        base(input_ids=input_ids, attention_mask=attention_mask,
             position_ids=position_ids(attention_mask), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str = "mean", start: int = 0) -> torch.Tensor:
    """Pool [batch, tokens, d] over each row's real tokens. ``start`` skips the first
    real tokens for ``mean``/``max`` (scaled down when a row is shorter than 2*start)."""
    if how not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {how!r}")
    mask = mask.bool()
    lengths = mask.sum(-1)
    rank = mask.long().cumsum(-1) - 1  # index among real tokens
    if how == "last":
        last = torch.where(mask, rank, torch.full_like(rank, -1)).argmax(-1)
        return hidden[torch.arange(hidden.shape[0]), last]
    eff_start = torch.minimum(torch.full_like(lengths, start), lengths // 2)
    keep = mask & (rank >= eff_start[:, None])
    if how == "mean":
        w = keep.to(hidden.dtype)[..., None]
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1)
    return hidden.masked_fill(~keep[..., None], float("-inf")).amax(1)


def max_context(model, tokenizer, cap: int = 2048) -> int:
    n = getattr(text_config(model), "max_position_embeddings", None) or cap
    return int(min(n, cap))


@torch.no_grad()
def token_states(model, seqs: Sequence[Sequence[int]], layer: int | Sequence[int], *, pad_id: int = 0,
                 batch_size: int = 16, max_len: int = 2048, overlap: int | None = None) -> list[torch.Tensor]:
    """Per-token residual stream for each sequence (float32, on the CPU): [tokens, hidden]
    at one layer, or [tokens, len(layers), hidden] for a list of layers read in one pass.
    Long sequences go through the readers' window loop."""
    layers = [check_layer(model, k) for k in ([layer] if isinstance(layer, int) else layer)]

    def forward(ids, mask):
        hs = hidden_states(model, torch.from_numpy(ids), torch.from_numpy(mask), layers)
        return {"h": torch.stack([hs[k] for k in layers], 2).float().cpu().numpy()}
    out = [torch.from_numpy(r["h"]) for r in read_windowed(seqs, forward, max_len, batch_size=batch_size,
                                                             overlap=overlap, pad_id=pad_id)]
    return [h[:, 0] for h in out] if isinstance(layer, int) else out


@torch.no_grad()
def pooled_states(model, seqs: Sequence[Sequence[int]], layers: Iterable[int], *, pad_id: int = 0,
                  how: str = "mean", start: int = 0, batch_size: int = 16, progress: str | None = None) -> np.ndarray:
    """Pooled activations [n_seqs, n_layers, hidden] (float32), batched by length."""
    from tqdm import tqdm

    layers = [check_layer(model, k) for k in layers]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    d = None
    result = None
    bar = tqdm(total=sum(len(s) for s in seqs), desc=progress, unit="tok", disable=progress is None)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        hs = hidden_states(model, ids, mask, layers)
        stacked = torch.stack([pool(hs[k].float(), mask.to(hs[k].device), how, start) for k in layers], 1)
        if result is None:
            d = stacked.shape[-1]
            result = np.zeros((len(seqs), len(layers), d), dtype=np.float32)
        result[idx] = stacked.cpu().numpy()
        bar.update(int(mask.sum()))
    bar.close()
    return result


def default_read_layer(n_layers: int) -> int:
    """About two thirds of the way through the model, as the paper reads."""
    return int(math.floor(2 * n_layers / 3))


# Short everyday texts for measuring each layer's mean residual norm (steering's unit).
NEUTRAL_TEXTS = (
    "The meeting is scheduled for Tuesday at ten in the second floor conference room.",
    "To make the sauce, melt the butter in a pan and add the flour while stirring.",
    "The train leaves the central station every twenty minutes on weekdays.",
    "Please find attached the quarterly report and the updated spreadsheet.",
    "The library is open from nine to five and closed on public holidays.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The function returns a list of integers sorted in ascending order.",
    "He parked the car, locked the door and walked to the post office.",
)


@torch.no_grad()
def measure_residual_norms(model, tokenizer, texts: Sequence[str] = NEUTRAL_TEXTS) -> np.ndarray:
    """Mean L2 norm of each layer's output over the texts' tokens, first token excluded."""
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id or 0)
    n = len(decoder_layers(model))
    hs = hidden_states(model, ids, mask, range(n))
    keep = mask.bool().clone()
    keep[:, 0] = False
    keep = keep.to(model_device(model))
    return np.array([hs[k].float().norm(dim=-1)[keep].mean().item() for k in range(n)])

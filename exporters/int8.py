"""The int8 monitor: SmoothQuant-style rescaling, dynamic quantisation, and the
fidelity measure that picks the scheme.

Why not plain ``quantize_dynamic``: onnxruntime quantises each MatMul's activations
with one scale per tensor, so a few huge channels (SmolLM2's RMSNorm outputs) or huge
tokens (up to ~3,500 at a ``down_proj`` input) flatten every other value to a few
levels and the readout's ranking falls apart. Two fixes, both measured at export time:

- smoothing (Xiao et al. 2023, SmoothQuant): divide each input channel j of a MatMul by
  s_j = max|x_j|^a / max|W_j|^(1-a) and multiply the weight's column j by s_j. The
  division folds into the RMSNorm weight before q/k/v and gate/up, and into up_proj's
  rows before down_proj, so the fp32 function is unchanged and activations get flatter;
- keeping the ``down_proj`` MatMuls in fp32: their outliers are per token, which no
  per-channel rescaling removes.
"""
from __future__ import annotations

import copy

import numpy as np

SMOOTH_ALPHA = 0.75
# candidates, fastest first: (name, keep down_proj in fp32)
SCHEMES = (("smooth-all-matmul", False), ("smooth-skip-down-proj", True))
# a scheme is good enough when, per token against fp32, the n scores keep their ranking
# (mean Spearman) and the top-3 emotions stay the same on most tokens
MIN_SPEARMAN, MIN_TOP3 = 0.98, 0.75


def good_enough(f: dict) -> bool:
    return f["spearman_mean"] >= MIN_SPEARMAN and f["top3_agreement"] >= MIN_TOP3


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of a with the same row of b (no ties in practice)."""
    ra = a.argsort(-1).argsort(-1).astype(np.float64)
    rb = b.argsort(-1).argsort(-1).astype(np.float64)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))


def fidelity(ref: list[np.ndarray], got: list[np.ndarray], k: int = 3) -> dict:
    """Per-token agreement of two readouts: Spearman of the n scores, same top-k set."""
    a, b = np.concatenate(ref), np.concatenate(got)
    rho = _spearman_rows(a, b)
    top = lambda s: np.sort(np.argsort(-s, -1)[:, :k], -1)  # noqa: E731
    return {"tokens": int(len(a)), "spearman_mean": round(float(rho.mean()), 4),
            "spearman_min": round(float(rho.min()), 4),
            f"top{k}_agreement": round(float((top(a) == top(b)).all(-1).mean()), 4),
            "max_abs_diff": float(np.abs(a - b).max())}


def smoothed(model, tokenizer, layer: int, texts, alpha: float = SMOOTH_ALPHA):
    """A copy of ``model`` with SmoothQuant scales folded into blocks 0..layer (same fp32
    function), or None when the blocks' layout is not the Llama/Qwen2/Gemma3 one."""
    import torch

    from probes.architectures import decoder_layers, divide_norm_weight, mlp_up_down, smoothing_groups
    from probes.capture import hidden_states, pad_batch

    model = copy.deepcopy(model)
    blocks = list(decoder_layers(model))[:layer + 1]
    groups = [smoothing_groups(b) for b in blocks]
    if any(g is None for g in groups):
        return None
    amax: dict[int, torch.Tensor] = {}

    def record(module, inputs):
        x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
        amax[id(module)] = torch.maximum(amax[id(module)], x) if id(module) in amax else x

    readers = [lin for g in groups for _, lins in g for lin in lins[:1]] + [mlp_up_down(b)[1] for b in blocks]
    handles = [lin.register_forward_pre_hook(record) for lin in readers]
    try:
        ids, mask = pad_batch([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id or 0)
        hidden_states(model, ids, mask, [layer])
    finally:
        for h in handles:
            h.remove()
    def scale(x_max, weights):
        w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
        return (x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    with torch.no_grad():
        for block, g in zip(blocks, groups):
            for norm, lins in g:
                s = scale(amax[id(lins[0])], [lin.weight for lin in lins])
                divide_norm_weight(model, norm, s)
                for lin in lins:
                    lin.weight.mul_(s)
            up, down = mlp_up_down(block)
            s = scale(amax[id(down)], [down.weight])
            up.weight.div_(s[:, None])
            if up.bias is not None:
                up.bias.div_(s)
            down.weight.mul_(s)
    return model


def _module_paths(node) -> list[str]:
    """Module paths a node came from: "/prefix/blocks.3/mlp/down_proj/MatMul" ->
    ["prefix", "prefix.blocks.3", "prefix.blocks.3.mlp", "prefix.blocks.3.mlp.down_proj"]."""
    parts = node.name.strip("/").split("/")[:-1]
    return [".".join(parts[:i + 1]) for i in range(len(parts))]


class _DropPreprocessNotice:
    """Drops only onnxruntime's pre-processing advice; the caller's logging is untouched."""

    def filter(self, record) -> bool:
        return "pre-process" not in record.getMessage()


def quantize(fp32, out, skip_down_proj: bool):
    """Dynamic int8 (per-channel weights) of the prefix's MatMuls -> ModelProto; the
    probe head (and optionally every ``down_proj``) stays fp32."""
    import logging
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(fp32))
    paths = {n.name: _module_paths(n) for n in proto.graph.node}
    if not any("head" in p for p in paths.values()):
        raise ValueError(f"{fp32}: cannot find the probe head's nodes to keep them in fp32")
    keep = [n.name for n in proto.graph.node if n.op_type == "MatMul"
            and any(p == "head" or (skip_down_proj and p.endswith(".down_proj")) for p in paths[n.name])]
    root = logging.getLogger()
    quiet = _DropPreprocessNotice()
    root.addFilter(quiet)  # quantize_dynamic's "consider pre-processing" notice, on the root logger
    try:
        with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
            quantize_dynamic(proto, str(Path(tmp) / "q.onnx"), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=keep)
            return onnx.load(str(Path(tmp) / "q.onnx")), len(keep)
    finally:
        root.removeFilter(quiet)

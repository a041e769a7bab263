"""Every architecture quirk emoprobe relies on, in one module: adding an architecture
means editing this file alone.

- where a causal LM keeps its decoder blocks, and what a block returns (a tensor in
  transformers 5, a tuple whose first item it is before);
- what the exported prefix needs: the rotary embedding, per-layer attention types and
  the sliding window;
- what int8 smoothing needs: the norm before each group of projections, the names of
  the projections, and how a norm applies its weight.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

BLOCK_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
               "transformer.h", "gpt_neox.layers", "model.decoder.layers")
ATTENTION_TYPES = ("full_attention", "sliding_attention")
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
DOWN = "down_proj"


def text_config(model):
    """The language model's config (multimodal configs nest it as ``text_config``)."""
    config = model.config
    return getattr(config, "text_config", None) or config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of any supported causal LM (Llama, Qwen2, Gemma3, ...)."""
    n = text_config(model).num_hidden_layers
    for path in BLOCK_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) == n:
            return obj
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def block_output(output) -> torch.Tensor:
    """transformers 5 blocks return a tensor, older ones a tuple whose first item it is."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


# -- the exported prefix ------------------------------------------------------------
def rotary(model) -> tuple[nn.Module, bool]:
    """The rotary embedding (owned by the module that owns the blocks) and whether it
    takes a layer type (Gemma3 has one per attention type)."""
    blocks = decoder_layers(model)
    owner = next(m for m in model.modules() if getattr(m, "layers", None) is blocks)
    rope = owner.rotary_emb
    return rope, "layer_type" in inspect.signature(rope.forward).parameters


def attention_types(model) -> tuple[list[str], int | None]:
    """Each layer's attention type and the sliding window (None: no sliding layers)."""
    cfg = text_config(model)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    unknown = set(types) - set(ATTENTION_TYPES)
    if unknown:
        raise ValueError(f"cannot export layer types {sorted(unknown)} of {cfg.model_type}")
    return types, getattr(cfg, "sliding_window", None)


# -- int8 smoothing -----------------------------------------------------------------
def smoothing_groups(block):
    """(norm before the inputs, Linear layers reading them) of one decoder block, or
    None for a layout this does not know (the block is then left as it is)."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    pre_mlp = getattr(block, "pre_feedforward_layernorm", None) or getattr(block, "post_attention_layernorm", None)
    names = [(attn, QKV), (mlp, GATE_UP + (DOWN,))]
    if getattr(block, "input_layernorm", None) is None or pre_mlp is None \
            or any(m is None or any(getattr(m, n, None) is None for n in ns) for m, ns in names):
        return None
    return [(block.input_layernorm, [getattr(attn, n) for n in QKV]), (pre_mlp, [getattr(mlp, n) for n in GATE_UP])]


def mlp_up_down(block) -> tuple[nn.Linear, nn.Linear]:
    return getattr(block.mlp, GATE_UP[1]), getattr(block.mlp, DOWN)


def divide_norm_weight(model, norm: nn.Module, s: torch.Tensor) -> None:
    """Make ``norm``'s output s times smaller per channel: Gemma's norms compute
    x_hat * (1 + w), the others x_hat * w."""
    if "gemma" in getattr(model.config, "model_type", ""):
        norm.weight.copy_((1 + norm.weight) / s - 1)
    else:
        norm.weight.div_(s)

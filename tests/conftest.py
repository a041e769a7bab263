"""Shared fixtures: tiny random models of each supported architecture, a tiny offline
tokenizer with a chat template, and a bank fitted on them. No file leaves the test dir."""
from __future__ import annotations

import numpy as np
import pytest
import torch

WORDS = ("the a i you he she we they it is was am are to of and in on at for with my your "
         "took mg tylenol pain back dog food hours days months runway students exam pass tests fail "
         "help please now again still cannot must will happy sad afraid calm angry glad tired "
         "run code error fix deadline budget money time home work friend family day night "
         "user assistant system hello thanks sorry yes no ok . , ! ? : ' 0 1 2 3 4 5 6 7 8 9").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["\n"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(arch: str, vocab_size: int, layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=3, bos_token_id=2)
    if arch == "gemma3":
        common.update(head_dim=8, sliding_window=16, layer_types=None, query_pre_attn_scalar=8)
        cfg = AutoConfig.for_model("gemma3_text", **common)
    else:
        cfg = AutoConfig.for_model(arch, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.emoprobe_name = f"tiny-{arch}"
    return model


ARCHS = ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tokenizer):
    """(model, tokenizer) for each architecture."""
    return make_model(request.param, len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return make_model("llama", len(tokenizer)), tokenizer


def random_bank(model, tokenizer, labels=("afraid", "calm", "desperate", "happy", "angry"), layer=2, seed=0):
    """A bank with random unit directions, for tests that need any valid bank."""
    from probes.bank import ProbeBank
    from probes.models import fingerprint

    rng = np.random.default_rng(seed)
    fp = fingerprint(model, tokenizer)
    n, d, L = len(labels), fp["hidden_size"], fp["layers"]
    dirs = rng.normal(size=(n, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lv = rng.normal(size=(L, n, d))
    lv /= np.linalg.norm(lv, axis=2, keepdims=True)
    tensors = {"vectors": lv[layer], "directions": dirs, "dim_mean": rng.normal(size=d) * 0.1,
               "dim_scale": rng.uniform(0.5, 2, size=d), "probe_coef": rng.normal(size=(n, d)),
               "probe_intercept": rng.normal(size=n), "score_mean": rng.normal(size=n),
               "score_std": rng.uniform(0.5, 2, size=n), "layer_vectors": lv}
    return ProbeBank(list(labels), layer, fp, {k: np.asarray(v, np.float32) for k, v in tensors.items()})


@pytest.fixture
def bank_for():
    return random_bank


def save_tiny_run(root, tokenizer, **bank_kwargs):
    """A saved tiny Llama (root/model) and a run directory (root/run) whose bank was made
    for it: what the command-line tests load by path."""
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_bank(model, tokenizer, **bank_kwargs).save(root / "run" / "bank")
    return root

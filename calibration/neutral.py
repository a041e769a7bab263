"""The neutral set: ordinary requests and short chats that define "zero" for every probe.

Every token of their messages gives the "ordinary text" baseline the bank's z-scores
use (the monitor reads text token by token); the prompts, read where the suites are
read (the reply token), also give a per-position baseline for that one stereotyped
token. All written for emoprobe (``neutral.json``) and free of scenarios.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class NeutralSet:
    prompts: tuple[str, ...]
    chats: tuple[tuple[dict, ...], ...]  # each a list of {"role", "content"} messages

    def __len__(self) -> int:
        return len(self.prompts) + len(self.chats)


def neutral_set() -> NeutralSet:
    """Hand-written prompts + templates x topics, and one- and two-exchange chats."""
    doc = json.loads((resources.files("calibration") / "neutral.json").read_text())
    prompts = list(doc["prompts"]) + [t.replace("{topic}", topic) for t in doc["templates"] for topic in doc["topics"]]
    pairs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in doc["exchanges"]]
    chats = pairs + [pairs[i] + pairs[i + 1] for i in range(0, len(pairs) - 1, 2)]
    return NeutralSet(tuple(prompts), tuple(tuple(c) for c in chats))


def chat_tokens(tokenizer, messages, generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a chat in the model's template, and the indices of the tokens inside
    the messages' own text. The template's preamble and turn markers are left out: they
    are the same in every chat and would only repeat a few readouts many times."""
    from probes.tokens import chat_prompt

    messages = list(messages)
    if len(messages) == 1 and generation_prompt:
        text = chat_prompt(tokenizer, messages[0]["content"])  # exactly what read_chat reads
    elif getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    else:
        text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    spans, pos = [], 0
    for m in messages:
        a = text.index(m["content"], pos)
        spans.append((a, a + len(m["content"])))
        pos = a + len(m["content"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and any(lo <= a < hi for lo, hi in spans)]
    return enc["input_ids"], inside

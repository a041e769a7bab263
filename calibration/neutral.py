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
    """Token ids of a chat as every reader renders it, and the indices of the tokens
    inside the messages' own text. The template's preamble and turn markers are left
    out: they are the same in every chat and would only repeat a few readouts many times."""
    from probes.tokens import encode_chat

    _, ids, _, members = encode_chat(tokenizer, list(messages), generation_prompt)
    return ids, [i for m in members for i in m]

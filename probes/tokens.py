"""Token-level helpers that need no torch, shared by the torch and onnxruntime readers."""
from __future__ import annotations

from typing import Sequence


def windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping windows over a long sequence: (begin, end, own_from, own_to). Each
    token is owned by exactly one window; past the first, a window gives up the first
    ``overlap // 2`` of its tokens, which the previous window read with more context."""
    if n_tokens <= size:
        return [(0, n_tokens, 0, n_tokens)]
    overlap = min(overlap, size // 2)  # a small model's context must still move forward
    step = size - overlap
    spans, begin = [], 0
    while True:
        end = min(begin + size, n_tokens)
        spans.append((begin, end))
        if end == n_tokens:
            break
        begin += step
    owns = [0] + [b + overlap // 2 for b, _ in spans[1:]] + [n_tokens]
    return [(b, e, owns[k], owns[k + 1]) for k, (b, e) in enumerate(spans)]


def _locate(text: str, contents: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character span of each message's (stripped) content in the rendered text, in order."""
    out, cursor = [], 0
    for c in contents:
        key = c.strip()
        i = text.find(key, cursor)
        if i < 0:
            return None
        out.append((i, i + len(key)))
        cursor = i + len(key)
    return out


def render_chat(tokenizer, messages: Sequence[dict], generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as the model sees it, and the character span of each message in it.

    The one renderer every reader, calibration, scan and integration uses, so they all
    see the same text: the model's chat template when it has one and it keeps every
    message (some refuse a conversation, e.g. one without strict user/assistant turns);
    otherwise plain ``User: ...`` blocks, ending in ``Assistant:`` when a reply follows."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
            where = _locate(text, [m["content"] for m in msgs])
            if where is not None:
                return text, where
        except (TemplateError, ValueError, TypeError, KeyError):
            pass
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in msgs)
    if generation_prompt:
        text += "Assistant:"
    return text, _locate(text, [m["content"] for m in msgs])


def message_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Token indices of each message, from tokens' character offsets: a token belongs to
    the first message its characters overlap; template tokens (role headers, separators)
    belong to none."""
    taken = [False] * len(offsets)
    out = []
    for s, e in spans:
        mine = [i for i, (a, b) in enumerate(offsets) if not taken[i] and b > a and a < e and b > s]
        for i in mine:
            taken[i] = True
        out.append(mine)
    return out


def encode_chat(tokenizer, messages: Sequence[dict], generation_prompt: bool = False):
    """(text, token ids, token offsets, each message's token indices) of a rendered chat."""
    text, spans = render_chat(tokenizer, messages, generation_prompt)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError("reading chats needs a fast tokenizer (tokens map to messages by character offsets)") from None
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    return text, list(enc["input_ids"]), offsets, message_tokens(offsets, spans)


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The prompt text up to and including the tokens that open the assistant's reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return render_chat(tokenizer, messages, generation_prompt=True)[0]


def chat_read_positions(tokenizer, user_text: str, system: str | None = None) -> tuple[list[int], int, int]:
    """Token ids of a one-turn chat, the index of the token that opens the assistant's
    reply (the last prompt token), and the index of the last token of the user's text."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    _, ids, _, members = encode_chat(tokenizer, messages, generation_prompt=True)
    return ids, len(ids) - 1, members[-1][-1]

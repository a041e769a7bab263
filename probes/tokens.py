"""Token-level helpers that need no torch, shared by the torch and onnxruntime readers:
long-text windows, the batching loop, and the one chat renderer."""
from __future__ import annotations

import re
import warnings
from typing import Sequence

import numpy as np


POOLS = ("mean", "last", "max")  # how a text's per-token readouts become one


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
    if len(spans) > 1:  # the last window reads a full window back from the end, not a short tail
        spans[-1] = (max(0, n_tokens - size), n_tokens)
    owns = [0] + [b + overlap // 2 for b, _ in spans[1:]] + [n_tokens]
    return [(b, e, owns[k], owns[k + 1]) for k, (b, e) in enumerate(spans)]


def default_overlap(max_len: int) -> int:
    """Tokens two neighbouring windows share: enough context, never most of a window."""
    return min(256, max_len // 4)


def length_groups(lengths: Sequence[int], waste: float = 0.15, max_tokens: int = 32768,
                  max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped by length so that padding a group to its longest member costs at
    most ``waste`` extra (padded positions are paid for like real tokens), with at most
    ``max_tokens`` padded tokens and ``max_rows`` rows per group."""
    groups, cur, total = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        width = lengths[cur[0]] if cur else lengths[i]
        wide = width * (len(cur) + 1)
        full = max_rows is not None and len(cur) >= max_rows
        if cur and (full or wide > (total + lengths[i]) * (1 + waste) or wide > max_tokens):
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    return groups + [cur] if cur else groups


def read_windowed(seqs: Sequence[Sequence[int]], forward, max_len: int, *, batch_size: int = 16,
                  overlap: int | None = None, pad_id: int = 0, progress=None) -> list[dict]:
    """The one loop every reader runs: each sequence cut into windows of at most
    ``max_len`` tokens (each token kept from the window that saw it with the most
    context), windows batched by length and right-padded, ``forward(ids, mask)``
    ([B, T] int64 arrays -> {name: array [B, T, ...]}) run per batch, outputs stitched
    back per sequence: {name: [tokens, ...]}. ``progress(n)``, if given, is called after
    each batch with the tokens it finished, so a long text shows progress as it is read."""
    overlap = default_overlap(max_len) if overlap is None else overlap
    arrays = []
    for i, s in enumerate(seqs):
        a = np.asarray(s)
        if a.ndim != 1 or a.size == 0 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"sequence {i}: expected a non-empty 1-d list of token ids, got shape {list(a.shape)}")
        arrays.append(a.astype(np.int64))
    cuts = [windows(len(a), max_len, overlap) for a in arrays]
    long = [i for i, c in enumerate(cuts) if len(c) > 1]
    if long:
        warnings.warn(f"{len(long)} sequence(s) longer than the context of {max_len} tokens (the first: "
                      f"sequence {long[0]}, {len(arrays[long[0]])} tokens) read in overlapping windows", stacklevel=3)
    pieces = [(i, k, *w) for i, c in enumerate(cuts) for k, w in enumerate(c)]
    parts: dict[tuple[int, int], dict] = {}
    budget = max(max_len, 8192)  # padded tokens per forward: bounds memory, and progress moves inside a long text
    for group in length_groups([p[3] - p[2] for p in pieces], max_tokens=budget, max_rows=batch_size):
        chunk = [pieces[p] for p in group]
        width = max(end - begin for _, _, begin, end, _, _ in chunk)
        ids = np.full((len(chunk), width), pad_id, np.int64)
        mask = np.zeros((len(chunk), width), np.int64)
        for row, (i, _, begin, end, _, _) in enumerate(chunk):
            ids[row, :end - begin], mask[row, :end - begin] = arrays[i][begin:end], 1
        out = forward(ids, mask)
        for row, (i, k, begin, _, own_from, own_to) in enumerate(chunk):
            parts[i, k] = {name: v[row, own_from - begin:own_to - begin] for name, v in out.items()}
        if progress is not None:
            progress(sum(own_to - own_from for *_, own_from, own_to in chunk))
    return [{name: np.concatenate([parts[i, k][name] for k in range(len(c))]) for name in parts[i, 0]}
            for i, c in enumerate(cuts)]


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


def _template_spans(tokenizer, msgs: list[dict], generation_prompt: bool) -> tuple[str, list[tuple[int, int]]] | None:
    """Render with the template and find each message exactly: the template is rendered
    once more with a unique marker in place of each content, and the markers' places are
    the messages' places (a plain text search could land in the template's own text,
    e.g. "help" inside SmolLM2's default system prompt). None when the template changes
    the contents (e.g. strips them): then the markers do not tell where they went."""
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    marks = [f"\u2060emoprobe-message-{k}\u2060" for k in range(len(msgs))]
    skeleton = tokenizer.apply_chat_template([dict(m, content=mk) for m, mk in zip(msgs, marks)], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    parts, spans, pos, length = [], [], 0, 0
    for m, mk in zip(msgs, marks):
        i = skeleton.find(mk, pos)
        if i < 0:
            return None
        parts.append(skeleton[pos:i])
        length += i - pos
        c = m["content"]
        lead = len(c) - len(c.lstrip())
        spans.append((length + lead, length + len(c.rstrip())))
        parts.append(c)
        length += len(c)
        pos = i + len(mk)
    parts.append(skeleton[pos:])
    return (text, spans) if "".join(parts) == text else None


def render_chat(tokenizer, messages: Sequence[dict], generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as the model sees it, and the character span of each message in it.

    The one renderer every reader, calibration, scan and integration uses, so they all
    see the same text: the model's chat template when it has one and accepts the
    conversation (some refuse one without strict user/assistant turns); otherwise plain
    ``User: ...`` blocks, ending in ``Assistant:`` when a reply follows."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            found = _template_spans(tokenizer, msgs, generation_prompt)
            if found is None:  # the template rewrites contents: find them in order, as written
                text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
                where = _locate(text, [m["content"] for m in msgs])
                found = None if where is None else (text, where)
            if found is not None:
                return found
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
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = off[:, 0], off[:, 1]
    free = ends > starts
    out = []
    for s, e in spans:
        mine = free & (starts < e) & (ends > s)
        free &= ~mine
        out.append(np.flatnonzero(mine).tolist())
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


def encode_turn(tokenizer, user_text: str) -> tuple[list[int], list[int]]:
    """Token ids of a one-turn chat as every reader renders it (up to the token that opens
    the reply, the last one), and the indices of the user's own tokens."""
    _, ids, _, members = encode_chat(tokenizer, [{"role": "user", "content": user_text}], generation_prompt=True)
    if not members[-1]:
        raise ValueError(f"user turn {user_text!r} has no tokens of its own in the rendered chat")
    return ids, members[-1]


CHAT_AT = ("reply", "user", "user_mean")
REPLY_K = re.compile(r"^reply-([1-9][0-9]*)$")


def check_position(at: str) -> None:
    if at not in CHAT_AT and not REPLY_K.match(at):
        raise ValueError(f"read position must be 'reply', 'user', 'user_mean' or 'reply-K' (K >= 1), got {at!r}")


def read_position(states, at: str, user: Sequence[int]):
    """The row(s) of a one-turn chat's per-token ``states`` [tokens, ...] that ``at`` reads:
    ``reply`` (the token that opens the reply, the paper's), ``user`` (the user's last
    token), ``user_mean`` (the mean over the user's tokens ``user``) or ``reply-K`` (the
    template token K places before ``reply``)."""
    if at == "user_mean":
        return states[list(user)].mean(0)
    if at == "user":
        return states[user[-1]]
    if at == "reply":
        return states[-1]
    check_position(at)
    k = int(REPLY_K.match(at).group(1))
    if len(states) - 1 - k <= user[-1]:
        raise ValueError(f"position {at!r} lies inside the user's turn: the template has fewer than {k} "
                         "tokens between the user's text and the reply")
    return states[-1 - k]

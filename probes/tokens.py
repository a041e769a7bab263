"""Token-level helpers that need no torch, shared by the torch and onnxruntime readers."""
from __future__ import annotations


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


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The prompt text up to and including the tokens that open the assistant's reply."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (f"{system}\n\n" if system else "") + f"User: {user_text}\nAssistant:"


def chat_read_positions(tokenizer, user_text: str, system: str | None = None) -> tuple[list[int], int, int]:
    """Token ids of a one-turn chat, the index of the token that opens the assistant's
    reply (the last prompt token), and the index of the last token of the user's text."""
    prompt = chat_prompt(tokenizer, user_text, system)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    user_end_char = prompt.rfind(user_text) + len(user_text)
    user_last = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < user_end_char)
    return ids, len(ids) - 1, user_last

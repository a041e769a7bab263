"""Layer naming, early stop, padding invariance, pooling and chat positions."""
import copy
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from probes.architectures import decoder_layers
from probes.capture import hidden_states, pad_batch, pool, pooled_states, token_states
from probes.tokens import encode_turn, read_position, windows

TEXTS = ["i took 4 mg of tylenol for my back pain .", "the dog is home", "help",
         "we must fix the code now , the tests still fail again and again and the deadline is at night ."]


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_layer_k_is_output_of_block_k(tiny):
    model, tok = tiny
    seq = ids(tok, TEXTS[:1])
    x, m = pad_batch(seq, tok.pad_token_id)
    mine = hidden_states(model, x, m, [0, 2])
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states
    assert torch.allclose(mine[0], ref[1], atol=1e-5)
    assert torch.allclose(mine[2], ref[3], atol=1e-5)


def test_capture_stops_at_deepest_layer(tiny):
    model, tok = tiny
    blocks = decoder_layers(model)
    called = []
    h = blocks[-1].register_forward_hook(lambda *a: called.append(1))
    try:
        x, m = pad_batch(ids(tok, TEXTS[:1]), tok.pad_token_id)
        hidden_states(model, x, m, [1])
    finally:
        h.remove()
    assert called == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_a_readout(tiny, side):
    model, tok = tiny
    seqs = ids(tok, TEXTS)
    alone = [hidden_states(model, *pad_batch([s], 0), [2])[2][0] for s in seqs]
    x, m = pad_batch(seqs, tok.pad_token_id, side)
    batch = hidden_states(model, x, m, [2])[2]
    for i, s in enumerate(seqs):
        rows = m[i].bool()
        assert torch.allclose(batch[i][rows], alone[i], atol=1e-4), (side, i)


def test_batch_of_64_matches_batch_of_1(tiny_llama):
    model, tok = tiny_llama
    seqs = ids(tok, TEXTS) * 16
    big = pooled_states(model, seqs, [1, 3], pad_id=0, batch_size=64)
    one = pooled_states(model, seqs[:4], [1, 3], pad_id=0, batch_size=1)
    np.testing.assert_allclose(big[:4], one, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=5), st.integers(0, 6))
def test_pool_ignores_padding(lengths, start):
    torch.manual_seed(0)
    h = torch.randn(len(lengths), max(lengths), 4)
    for how in ("mean", "last", "max"):
        for side in ("left", "right"):
            _, mask = pad_batch([[1] * n for n in lengths], 0, side)
            hh = h.clone()
            hh[mask == 0] = 1e6  # garbage in pad positions must not leak
            got = pool(hh, mask, how, start)
            for i, n in enumerate(lengths):
                real = hh[i][mask[i].bool()]
                k = min(start, n // 2)
                ref = {"mean": real[k:].mean(0), "max": real[k:].amax(0), "last": real[-1]}[how]
                assert torch.allclose(got[i], ref, atol=1e-5)


@given(st.integers(1, 600), st.integers(8, 128), st.integers(0, 300))
def test_windows_cover_each_token_once(n, size, overlap):
    """Any overlap, even one past the window size (a small model's context), terminates."""
    wins = windows(n, size, overlap)
    owned = []
    for b, e, own_from, own_to in wins:
        assert e - b <= size and b <= own_from <= own_to <= e
        owned += list(range(own_from, own_to))
    assert owned == list(range(n))


def test_long_text_read_in_windows_matches_short_reads(tiny_llama):
    model, tok = tiny_llama
    seq = ids(tok, [" ".join(TEXTS * 6)])[0]
    with pytest.warns(UserWarning, match="overlapping windows"):
        long = token_states(model, [seq], 2, max_len=32, overlap=16)[0]
    full = token_states(model, [seq], 2, max_len=1024)[0]
    assert long.shape == full.shape
    np.testing.assert_allclose(long[:24], full[:24], atol=1e-4)  # tokens the first window owns are exact


def test_read_positions_of_a_turn(tokenizer):
    seq, user = encode_turn(tokenizer, "i took 8 mg of tylenol")
    toks = np.array(tokenizer.convert_ids_to_tokens(seq))
    assert read_position(toks, "reply", user) == "assistant"  # the tiny tokenizer drops the newline
    assert read_position(toks, "user", user) == "tylenol" and list(toks[user]) == "i took 8 mg of tylenol".split()
    assert read_position(toks, "reply-1", user) == toks[-2] and len(seq) - 2 > user[-1]
    with pytest.raises(ValueError, match="inside the user's turn"):
        read_position(toks, f"reply-{len(seq) - user[-1] - 1}", user)
    with pytest.raises(ValueError, match="read position must be"):
        read_position(toks, "reply-0", user)


def test_check_layer_out_of_range(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="out of range"):
        hidden_states(model, *pad_batch([[5, 6]], 0), [99])


def test_one_renderer_for_every_reader(tokenizer):
    """Calibration, scan and chat reads see the same tokens for the same chat, with the
    template and with the plain fallback of a tokenizer that has none (gemma3-270m base)."""
    from calibration.neutral import chat_tokens
    from monitor.logscan.readers import Conversation
    from monitor.logscan.scan import encode
    from probes.tokens import chat_prompt, render_chat

    chat = [{"role": "user", "content": "the tests fail again ."}, {"role": "assistant", "content": "let me look ."}]
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    for tok in (tokenizer, bare):
        text, spans = render_chat(tok, chat)
        assert [text[a:b] for a, b in spans] == [m["content"] for m in chat]
        ids, inside = chat_tokens(tok, chat)
        enc = encode(tok, Conversation("c", chat, "test"))
        assert enc.ids == ids and sorted(int(i) for m in enc.members for i in m) == inside
        one = [{"role": "user", "content": "hello there"}]
        assert chat_tokens(tok, one, generation_prompt=True)[0] == tok(chat_prompt(tok, "hello there"),
                                                                        add_special_tokens=False)["input_ids"]
    assert render_chat(bare, chat[:1], generation_prompt=True)[0] == "User: the tests fail again .\n\nAssistant:"


def test_messages_are_found_after_the_template_text_that_contains_them(tokenizer):
    """SmolLM2's template opens with a default system prompt ("You are a helpful AI
    assistant..."): a user turn "help" must map to its own tokens, not the prompt's."""
    from probes.tokens import encode_chat

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("<|im_start|>system\nyou help the user .<|im_end|>\n" + tok.chat_template)
    text, ids, offsets, members = encode_chat(tok, [{"role": "user", "content": "help"},
                                                    {"role": "assistant", "content": "user"}])
    assert [text[offsets[m[0]][0]:offsets[m[-1]][1]] for m in members] == ["help", "user"]
    assert text.index("help") < offsets[members[0][0]][0]  # the system prompt's "help" is not the message
    ids, user = encode_turn(tok, "help")
    assert tok.decode([ids[user[-1]]]).strip() == "help" and user[-1] > 5


@given(st.lists(st.integers(1, 200), min_size=1, max_size=6), st.integers(8, 64), st.integers(1, 5))
def test_window_loop_returns_every_token_once(lengths, max_len, batch_size):
    """The loop every reader runs: each token comes back exactly once, in order, no
    forward call sees more than max_len tokens or batch_size rows."""
    from probes.tokens import read_windowed

    seen = []

    def forward(ids, mask):
        seen.append(ids.shape)
        assert (ids[mask == 0] == -1).all()  # padding on the right only, with pad_id
        return {"x": ids[..., None].astype(float)}
    seqs = [list(range(n)) for n in lengths]
    out = read_windowed(seqs, forward, max_len, batch_size=batch_size, pad_id=-1)
    assert [o["x"][:, 0].tolist() for o in out] == seqs
    assert all(w <= max_len and b <= batch_size for b, w in seen)


@given(st.lists(st.integers(1, 3000), max_size=40))
def test_length_groups_bound_the_padding(lengths):
    from probes.tokens import length_groups

    groups = length_groups(lengths, waste=0.15, max_tokens=8192, max_rows=7)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest, real = max(lengths[i] for i in g), sum(lengths[i] for i in g)
        assert len(g) == 1 or (longest * len(g) <= 1.15 * real and longest * len(g) <= 8192 and len(g) <= 7)


def test_long_text_warns_once_per_call(tiny_llama):
    model, tok = tiny_llama
    with pytest.warns(UserWarning, match="2 sequence") as rec:
        token_states(model, [list(range(5, 80)), list(range(5, 90)), [5, 6]], 1, max_len=32)
    assert len(rec) == 1


def test_inputs_are_moved_to_the_model_device(tiny_llama, monkeypatch):
    """Every torch path sends its inputs to the model's device (a GPU user's model lives
    there): the device object capture reports is the one each input is moved to."""
    from probes import capture
    from probes.reader import TorchReader

    model, tok = tiny_llama
    where = torch.device("cpu")  # identity, not equality, marks the model's device
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        if a and a[0] is where:
            moved.append(tuple(self.shape))
        return real_to(self, *a, **k)
    monkeypatch.setattr(capture, "model_device", lambda m: where)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    token_states(model, [[5, 6, 7]], 1)
    assert moved.count((1, 3)) == 2  # ids and mask
    moved.clear()
    pooled_states(model, [[5, 6, 7, 8]], [0, 1])
    assert moved.count((1, 4)) >= 2
    moved.clear()
    from conftest import random_bank

    reader = TorchReader(model, tok, random_bank(model, tok))
    moved.clear()
    n = len(reader.encode(["a b c"])[0])
    reader.read(["a b c"])
    assert moved.count((1, n)) == 2  # the batch's ids and mask

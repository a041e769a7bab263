"""The log readers against the garbage real logs hold: fuzzed lines, records, archives and
documents never crash or hang the readers, each bad record is reported at its place and
every good one around it is still read; readers stream (no read-ahead); a huge message is
capped, the cut noted, and progress moves while it is read."""
from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from monitor.logscan import readers
from monitor.logscan.readers import Conversation, Skipped, read_file, read_logs
from monitor.logscan.scan import MAX_MESSAGE_TOKENS, cap_message, encode, make_rules, scan, scan_batch
from monitor.samples import make_samples
from probes.reader import TorchReader

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# JSON built from the words the readers look for, so the fuzz reaches deep into each format
KEYS = st.sampled_from(["messages", "role", "content", "type", "text", "tool_calls", "function", "arguments", "name",
                        "system", "samples", "id", "epoch", "choices", "message", "request", "response", "parts",
                        "attributes", "resourceSpans", "scopeSpans", "spans", "gen_ai.input.messages", "error"])
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                   st.text(st.characters(blacklist_categories=()), max_size=8),  # lone surrogates too
                   st.sampled_from(["user", "assistant", "tool", "text", "tool_use", "tool_result", "image", "[oops"]))
JSONISH = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=5)), max_leaves=25)


def good(k: int) -> dict:
    return {"id": f"good{k}", "messages": [{"role": "user", "content": f"marker {k} please help"},
                                           {"role": "assistant", "content": "on it"}]}


def garbage_line(kind: str, data) -> bytes:
    """One line of a kind of damage, never blank and never holding a newline."""
    if kind == "bytes":
        raw = data.draw(st.binary(min_size=1, max_size=60)).replace(b"\n", b" ")
        return raw if raw.strip() else b"\xff"
    if kind == "cut":  # a good record cut short
        raw = json.dumps(good(-1)).encode()
        return raw[:data.draw(st.integers(1, len(raw) - 1))]
    if kind == "utf8":  # valid JSON but for one invalid byte
        raw = json.dumps(good(-1)).encode()
        i = data.draw(st.integers(0, len(raw) - 1))
        return raw[:i] + b"\xc3\x28" + raw[i:]
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    return json.dumps(data.draw(JSONISH)).encode()  # wrong types and missing fields


@FUZZ
@given(st.data())
def test_jsonl_fuzz_reports_each_bad_line_and_keeps_every_good_one(tmp_path_factory, data):
    kinds = data.draw(st.lists(st.sampled_from(["good", "bytes", "cut", "utf8", "deep", "json"]), min_size=1, max_size=12))
    lines = [json.dumps(good(k)).encode() if kind == "good" else garbage_line(kind, data) for k, kind in enumerate(kinds)]
    path = tmp_path_factory.mktemp("fuzz") / "log.jsonl"
    path.write_bytes(b"\n".join(lines) + data.draw(st.sampled_from([b"\n", b""])))
    items = list(read_file(path))
    at = {}
    for item in items:
        where = item.source if isinstance(item, Skipped) else item.source
        assert where.startswith(f"{path}:"), where
        at.setdefault(int(where.rsplit(":", 1)[1]), []).append(item)
    for n, kind in enumerate(kinds, 1):
        if kind == "good":
            got = at.get(n, [])
            assert len(got) == 1 and isinstance(got[0], Conversation) and f"marker {n - 1} " in got[0].messages[0]["content"]
        elif kind in ("cut", "utf8", "deep", "bytes"):
            assert len(at.get(n, [])) == 1 and isinstance(at[n][0], Skipped), (kind, lines[n - 1][:80], at.get(n))
        else:  # random JSON: a conversation if it happens to be one, else reported, never both, never lost
            assert len(at.get(n, [])) == 1
    assert set(at) <= set(range(1, len(kinds) + 1))


def test_bad_lines_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 30_000)
    lines = [json.dumps(good(0)).encode(), b'{"messages": [\xff]}', b"[" * 20_000, b'{"messages": "' + b"x" * 50_000 + b'"}',
             json.dumps(good(4)).encode()]
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(read_logs([path]))
    reasons = {s.source.rsplit(":", 1)[1]: s.reason for s in items if isinstance(s, Skipped)}
    assert "invalid UTF-8 at byte" in reasons["2"]
    assert "nested too deeply" in reasons["3"]
    assert "bytes is over the 30000-byte record limit" in reasons["4"]
    assert [c.id for c in items if isinstance(c, Conversation)] == [f"{path}#good0", f"{path}#good4"]


def eval_archive(path: Path, n: int, zstd: bool) -> list[str]:
    samples = {f"samples/{k}_epoch_1.json": json.dumps(make_samples.fixture_inspect_sample(k)).encode() for k in range(1, n + 1)}
    if zstd:
        make_samples.write_zstd_zip(path, samples)
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in samples.items():
                zf.writestr(name, data)
    return list(samples)


@FUZZ
@given(n=st.integers(1, 6), zstd=st.booleans(), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3))
def test_eval_archives_cut_or_damaged_keep_every_member_before_the_damage(tmp_path_factory, n, zstd, cut, flips):
    path = tmp_path_factory.mktemp("eval") / "log.eval"
    names = eval_archive(path, n, zstd)
    raw = bytearray(path.read_bytes())
    ends = {}  # member -> byte where its data ends
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            ends[info.filename] = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size
    size = int(cut * len(raw))
    for where, x in flips:
        if size:
            raw[int(where * (size - 1))] ^= x
    path.write_bytes(bytes(raw[:size]))
    items = list(read_file(path, "inspect"))
    assert all(isinstance(i, (Conversation, Skipped)) for i in items)
    got = {i.source.split("!", 1)[1] for i in items if isinstance(i, Conversation)}
    if not flips:  # no member read twice
        per_member = [i.source for i in items if "!" in i.source]
        assert len(per_member) == len(set(per_member))
    if not flips and size < len(raw):  # only cut: every member whose data lies before the cut is read
        assert got == {m for m in names if ends[m] <= size}
    if not flips and size == len(raw):
        assert got == set(names)


@FUZZ
@given(doc=JSONISH, suffix=st.sampled_from([".json", ".jsonl", ".txt", ""]), fmt=st.sampled_from([None, *readers.FORMATS]))
def test_any_json_document_in_any_format_never_crashes(tmp_path_factory, doc, suffix, fmt):
    path = tmp_path_factory.mktemp("doc") / f"log{suffix}"
    path.write_text(json.dumps(doc, indent=data_indent(doc)))
    items = list(read_logs([path], fmt))
    assert all(isinstance(i, (Conversation, Skipped)) for i in items)
    assert all(c.messages for c in items if isinstance(c, Conversation))


def data_indent(doc):
    return 1 if isinstance(doc, dict) and len(doc) % 2 else None  # both pretty-printed and one-line documents


def test_documents_over_the_limit_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_DOCUMENT_BYTES", 100)
    (tmp_path / "big.json").write_text(json.dumps([good(k) for k in range(5)], indent=1))
    (tmp_path / "big.txt").write_text("User: hello\n" * 50)
    items = list(read_logs([tmp_path / "big.json", tmp_path / "big.txt"]))
    assert all(isinstance(i, Skipped) and "over the 100-byte limit" in i.reason for i in items) and len(items) == 2


def test_readers_do_not_read_ahead(tmp_path):
    """A JSONL log fed through a pipe one line at a time: the reader must hand over each
    conversation before it asks for the next line (a reader that read ahead would block)."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    handed, stalled = [threading.Event() for _ in range(5)], []

    def feed():
        with open(fifo, "wb", buffering=0) as f:
            for k in range(5):
                f.write(json.dumps(good(k)).encode() + b"\n")
                if not handed[k].wait(20):
                    stalled.append(k)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    got = []
    for item in read_logs([fifo], "openai"):
        got.append(item.id)
        handed[len(got) - 1].set()
    writer.join(30)
    assert not stalled, f"the reader waited for line {stalled[0] + 2} before handing over conversation {stalled[0] + 1}"
    assert got == [f"{fifo}#good{k}" for k in range(5)]


# -- huge messages ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reader(tokenizer):
    from conftest import make_model, random_bank

    model = make_model("llama", tokenizer.vocab_size)
    return TorchReader(model, tokenizer, random_bank(model, tokenizer))


@given(words=st.lists(st.sampled_from(["alpha", "beta", "gamma", "é", "🙂", "  ", "\n", "x" * 70]), min_size=0, max_size=300),
       cap=st.integers(1, 60))
@settings(max_examples=60, deadline=None)
def test_cap_keeps_at_most_the_first_tokens(tokenizer, words, cap):
    text = "".join(words)
    kept, cut = cap_message(tokenizer, text, cap)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert text.startswith(kept)
    if n <= cap:
        assert kept == text and cut is None
    else:
        assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= cap + 1  # one token may merge at the edge
        assert cut == {"max_tokens": cap, "chars_read": len(kept), "chars": len(text)}


def test_a_huge_message_is_capped_reported_and_shows_progress(reader, tmp_path):
    dump = "ERROR disk quota exceeded at block 4096\n" * 2000  # a tool dumping a log
    conv = Conversation("c", [{"role": "user", "content": "run it", "id": None},
                              {"role": "tool", "content": dump, "id": None},
                              {"role": "assistant", "content": "it failed", "id": None}], "x")
    ticks = []
    one = TorchReader(reader.model, reader.tokenizer, reader.bank, batch_size=1)  # a window per forward
    (_, lines, n), = scan_batch(one, [conv], make_rules(reader.bank), max_message_tokens=300, progress=ticks.append)
    assert [ln["cut"] is not None for ln in lines] == [False, True, False]
    assert lines[1]["cut"]["chars"] == len(dump) and 0 < lines[1]["cut"]["chars_read"] < len(dump)
    assert abs(lines[1]["n_tokens"] - 300) <= 2
    assert sum(ticks) == n and len(ticks) >= 2  # the bar moved before the conversation was done
    whole = encode(reader.tokenizer, conv, None)
    assert len(whole.ids) > 5 * n and whole.cuts == [None, None, None]
    assert MAX_MESSAGE_TOKENS >= 8192


def test_scan_cli_caps_messages_and_records_the_cap(tmp_path, tokenizer):
    from conftest import save_tiny_run
    from monitor.cli import main as cli

    root = save_tiny_run(tmp_path / "tiny", tokenizer)
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"id": "a", "messages": [{"role": "tool", "content": "word " * 3000}]}) + "\n")
    out = tmp_path / "scan.jsonl"
    assert cli(["scan", "--run", str(root / "run"), "--model", str(root / "model"), "--out", str(out), "--quiet",
                "--max-message-tokens", "100", str(log)]) == 0
    line, = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["cut"]["max_tokens"] == 100 and line["n_tokens"] <= 102
    summary = json.loads((tmp_path / "scan.summary.json").read_text())
    assert summary["settings"]["max_message_tokens"] == 100


def test_bfloat16_default_keeps_fidelity(tmp_path, tokenizer):
    """The speed default (bfloat16 where the CPU has the units) against float32 on the
    same conversations: per-token Spearman >= 0.98 and the same top-3 on >= 80% of tokens."""
    import torch
    from scipy.stats import spearmanr

    from conftest import make_model, random_bank

    model = make_model("llama", tokenizer.vocab_size, hidden=64)
    bank = random_bank(model, tokenizer)
    fast = make_model("llama", tokenizer.vocab_size, hidden=64).to(torch.bfloat16)
    convs = [Conversation(str(k), [{"role": "user", "content": f"the build failed {k} times, the tests time out", "id": None},
                                   {"role": "assistant", "content": "I will rerun them calmly and check the logs", "id": None}],
                          "x") for k in range(4)]
    ids = [encode(tokenizer, c).ids for c in convs]
    ref = np.concatenate(TorchReader(model, tokenizer, bank).score_ids(ids))
    got = np.concatenate(TorchReader(fast, tokenizer, bank).score_ids(ids))
    rho = np.mean([spearmanr(a, b)[0] for a, b in zip(ref, got)])
    top3 = np.mean([set(np.argsort(-a)[:3]) == set(np.argsort(-b)[:3]) for a, b in zip(ref, got)])
    assert rho >= 0.98 and top3 >= 0.8, (rho, top3)


def test_eval_sample_written_twice_counts_once_its_last_entry(tmp_path):
    """Inspect supersedes a requeued sample by writing its member again: the directory's
    last entry of a name is the one that counts, as zipfile resolves names."""
    path = tmp_path / "log.eval"
    eval_archive(path, 2, zstd=False)
    fresh = make_samples.fixture_inspect_sample(1)
    fresh["messages"][1]["content"] = "the fresh record"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("samples/1_epoch_1.json", json.dumps(fresh))
    got = [c for c in read_file(path) if isinstance(c, Conversation)]
    assert [c.source.split("!")[1] for c in got] == ["samples/2_epoch_1.json", "samples/1_epoch_1.json"]
    assert got[1].messages[1]["content"] == "the fresh record"


def test_eval_archive_over_65535_members_reads_through_zip64(tmp_path):
    path = tmp_path / "big.eval"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for k in range(70_000):
            zf.writestr(f"samples/{k}_epoch_1.json", b"{}" if k != 69_999 else json.dumps(good(k)).encode())
    items = list(read_file(path, "inspect"))
    assert sum(isinstance(i, Skipped) for i in items) == 69_999  # '{}' has no messages: reported, each
    assert [c.id for c in items if isinstance(c, Conversation)] == [f"{path}#good69999"]


def test_lone_surrogates_are_replaced_not_fatal(reader, tmp_path):
    """A cut emoji is valid JSON ("\\ud83d") but not UTF-8: the message is read with U+FFFD
    in its place, and the output file (ids and sources included) stays valid UTF-8."""
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"id": "x\ud83d", "messages": [{"role": "user", "content": "cut \ud83d emoji"}]}) + "\n")
    out = tmp_path / "scan.jsonl"
    s = scan([path], out, reader, progress=False)
    line, = [json.loads(x) for x in out.read_bytes().decode("utf-8").splitlines()]
    assert s["conversations"] == 1 and not s["skipped"] and line["conversation"].endswith("x\ufffd")


@pytest.mark.parametrize("flags,device,want", [(" fpu amx_bf16 avx512f", "cpu", "bfloat16"),
                                               (" fpu avx512_bf16", "cpu", "bfloat16"),
                                               (" fpu avx2 avx512f", "cpu", "float32"),
                                               (" amx_bf16", "mps", "float32")])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_the_units(tmp_path, monkeypatch, flags, device, want):
    from probes import models

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t:{flags}\n")
    monkeypatch.setattr(models, "CPUINFO", info)
    assert models.resolve_dtype("auto", device) == want
    assert models.resolve_dtype("float32", device) == "float32"
    from monitor.runs import reader_spec

    assert reader_spec("torch", device, "auto") == f"torch:{want}" and reader_spec("onnx") == "onnx:monitor.onnx"


def test_a_resume_in_another_precision_is_refused(reader, tmp_path):
    import torch

    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(good(k)) + "\n" for k in range(3)))
    out = tmp_path / "scan.jsonl"
    scan([path], out, reader, progress=False)
    assert json.loads((tmp_path / "scan.summary.json").read_text())["settings"]["reader"] == "torch:float32"
    half = TorchReader(reader.model.to(torch.bfloat16), reader.tokenizer, reader.bank)
    try:
        with pytest.raises(ValueError, match="other settings"):
            scan([path], out, half, progress=False)
    finally:
        reader.model.to(torch.float32)

"""Agent-log scanning: readers for every format, token-to-message mapping, windows,
flags, resumable output (cut at any byte, and a real SIGKILL), workers, and the HTML
report in a real headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import make_model, random_bank, save_tiny_run
from monitor.cli import main as cli
from monitor.logscan.readers import Conversation, Skipped, detect, read_file, read_logs
from monitor.rules import parse_rule
from monitor.samples import make_samples
from probes.tokens import message_tokens
from monitor.logscan.scan import (calibrated_thresholds, conversations, encode, finished, id_hash, make_rules,
                          margin, scan, scan_batch, spans)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "monitor" / "samples"
FIXTURES = SAMPLES / "fixtures"
EXPECTED = make_samples.FIXTURE_EXPECTED
LABELS = ("afraid", "calm", "desperate", "happy", "angry")


def convs(items):
    return [c for c in items if isinstance(c, Conversation)]


def skips(items):
    return [s for s in items if isinstance(s, Skipped)]


# -- readers ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,fmt,n", [("openai.jsonl", "openai", 1), ("anthropic.jsonl", "anthropic", 1),
                                        ("inspect.eval", "inspect", 2), ("inspect.json", "inspect", 1),
                                        ("otel.json", "otel", 1), ("plain.txt", "text", 1)])
def test_every_format_reads_the_same_exchange(name, fmt, n):
    path = FIXTURES / name
    assert detect(path) == fmt
    items = list(read_file(path))
    assert not skips(items) and len(convs(items)) == n
    for c in convs(items):
        assert [(m["role"], m["content"]) for m in c.messages] == EXPECTED
        assert c.id.startswith(str(path))
    assert len({c.id for c in convs(items)}) == n


def test_committed_fixtures_are_what_the_script_writes(tmp_path):
    make_samples.main(tmp_path)
    for f in sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")):
        assert (tmp_path / f).read_bytes() == (SAMPLES / f).read_bytes(), f"{f} is stale: run make_samples.py"


def test_eval_members_are_zstandard():
    """Inspect writes Zstandard members (method 93), which Python 3.11's own zipfile cannot
    open (inspect_ai patches zipfile when imported); the reader decompresses them itself."""
    with zipfile.ZipFile(FIXTURES / "inspect.eval") as zf:
        assert {i.compress_type for i in zf.infolist()} == {93}
        assert {"header.json", "summaries.json", "samples/1_epoch_1.json"} <= set(zf.namelist())


def test_format_override():
    forced = convs(read_file(FIXTURES / "anthropic.jsonl", "openai"))  # no top-level system, results stay user turns
    assert [(m["role"], m["content"]) for m in forced[0].messages] == [("user", EXPECTED[1][1]), EXPECTED[2],
                                                                        ("user", EXPECTED[3][1]), EXPECTED[4]]
    raw = convs(read_file(FIXTURES / "openai.jsonl", "text"))
    assert len(raw) == 1 and raw[0].messages[0]["content"].startswith('{"id": "fx"')
    wrong = list(read_file(FIXTURES / "otel.json", "openai"))
    assert not convs(wrong) and "no 'messages' list" in skips(wrong)[0].reason
    with pytest.raises(ValueError, match="unknown log format"):
        list(read_file(FIXTURES / "plain.txt", "csv"))


def test_request_response_records(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"request": {"messages": [{"role": "user", "content": "hi"}]},
                             "response": {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}}) + "\n"
                 + json.dumps({"request": {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]},
                               "response": {"role": "assistant", "type": "message", "content": [{"type": "text", "text": "yo"}]}}) + "\n")
    a, b = convs(read_logs([f]))
    assert [(m["role"], m["content"]) for m in a.messages] == [("user", "hi"), ("assistant", "hello")]
    assert [(m["role"], m["content"]) for m in b.messages] == [("system", "be brief"), ("user", "hi"), ("assistant", "yo")]


def test_malformed_inputs_are_reported_with_their_location(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hello"}]})
    lines = [good, "{not json", json.dumps({"messages": "x"}), json.dumps({"messages": [{"content": "no role"}]}),
             good, "[]", json.dumps({"messages": [{"role": "user", "content": "  "}]})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "broken.eval").write_bytes(b"PK\x03\x04 not really a zip")
    samples = {f"samples/{k}_epoch_1.json": json.dumps(make_samples.fixture_inspect_sample(k)).encode() for k in (1, 2)}
    make_samples.write_zstd_zip(tmp_path / "corrupt.eval", samples)
    data = bytearray((tmp_path / "corrupt.eval").read_bytes())
    data[60] ^= 0xFF  # inside the first member's compressed bytes
    (tmp_path / "corrupt.eval").write_bytes(bytes(data))
    (tmp_path / "spans.json").write_text(json.dumps([{"traceId": "t", "attributes": {"gen_ai.input.messages": "[oops"}}]))
    items = list(read_logs([tmp_path / n for n in ("bad.jsonl", "broken.eval", "corrupt.eval", "spans.json", "missing.jsonl")]))
    got = {s.source.replace(str(tmp_path) + "/", ""): s.reason for s in skips(items)}
    assert set(got) == {"bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:4", "bad.jsonl:6", "bad.jsonl:7", "broken.eval",
                        "corrupt.eval!samples/1_epoch_1.json", "spans.json:span[0]", "missing.jsonl"}
    assert "invalid JSON" in got["bad.jsonl:2"] and "no 'messages' list" in got["bad.jsonl:3"]
    assert "has no 'role'" in got["bad.jsonl:4"] and "no messages with text" in got["bad.jsonl:7"]
    assert "not valid JSON" in got["spans.json:span[0]"] and "no such file" in got["missing.jsonl"]
    assert [c.source.replace(str(tmp_path) + "/", "") for c in convs(items)] == ["bad.jsonl:1", "bad.jsonl:5", "corrupt.eval!samples/2_epoch_1.json"]


# -- the math ---------------------------------------------------------------------------
@given(st.lists(st.booleans(), max_size=60), st.integers(0, 4))
def test_spans_cover_exactly_the_true_tokens(mask, gap):
    mask = np.array(mask, bool)
    found = spans(mask, gap)
    covered = np.zeros(len(mask), bool)
    for a, b in found:
        assert mask[a] and mask[b - 1] and not covered[a:b].any()
        covered[a:b] = True
    assert (covered | ~mask).all()  # every True is in a span
    for (_, b1), (a2, _) in zip(found, found[1:]):
        assert a2 - b1 > gap  # runs closer than the gap were joined
    if gap == 0:
        assert (covered == mask).all()


@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.lists(st.integers(1, 30), max_size=8), st.data())
def test_tokens_belong_to_the_message_they_overlap(token_lens, gaps, data):
    ends = np.cumsum(token_lens)
    offsets = np.stack([ends - np.array(token_lens), ends], 1)
    text_len, pos, msgs = int(ends[-1]), 0, []
    for g in gaps:
        s = pos + data.draw(st.integers(0, 3))
        e = min(s + g, text_len)
        if s >= text_len:
            break
        msgs.append((s, e))
        pos = e
    members = message_tokens([tuple(o) for o in offsets], msgs)
    taken = set()
    for (s, e), idx in zip(msgs, members):
        want = [t for t, (a, b) in enumerate(offsets) if b > a and a < e and b > s and t not in taken]
        assert list(idx) == want  # every token it overlaps, unless an earlier message has it
        taken |= set(want)
    owner = np.concatenate(members) if members else np.array([])
    assert len(set(owner.tolist())) == len(owner)  # no token in two messages


_rule = st.builds(lambda e, op, v, k: parse_rule(f"{e}{op}{v}" + (f" rolling {k}" if k > 1 else "")),
                  st.sampled_from(LABELS), st.sampled_from([">", "<"]), st.integers(-2, 2), st.integers(1, 3))


@given(st.lists(_rule, min_size=1, max_size=3), st.sampled_from(["&", "|"]),
       st.lists(st.lists(st.floats(-3, 3), min_size=5, max_size=5), min_size=1, max_size=12))
def test_margin_is_positive_exactly_where_the_rule_fires(parts, joiner, scores):
    rule = parse_rule(f" {joiner} ".join(map(str, parts)))
    z = np.array(scores)
    series = {str(p): p.value_of(z, LABELS) for p in rule.leaves()}
    m = margin(rule, series)
    with np.errstate(invalid="ignore"):
        assert ((m > 0) == rule.evaluate(z, LABELS)).all()


# -- scanning with a tiny model ---------------------------------------------------------
@pytest.fixture(scope="module")
def reader(tokenizer):
    from probes.reader import TorchReader

    model = make_model("llama", len(tokenizer))
    return TorchReader(model, tokenizer, random_bank(model, tokenizer, labels=LABELS))


def sample_conversations():
    return convs(read_logs([SAMPLES]))


def test_long_conversations_read_in_windows(reader):
    conv = next(c for c in sample_conversations() if "frantic" in c.id)
    enc = encode(reader.tokenizer, conv)
    old = reader.max_len
    try:
        reader.max_len = 64
        stitched = reader.score_ids([enc.ids])[0]
    finally:
        reader.max_len = old
    from probes.tokens import windows

    wins = windows(len(enc.ids), 64, 16)
    assert len(wins) > 3 and stitched.shape == (len(enc.ids), len(LABELS))
    for b, e, own_from, own_to in wins:
        alone = reader.score_ids([enc.ids[b:e]])[0]
        np.testing.assert_allclose(stitched[own_from:own_to], alone[own_from - b:own_to - b], atol=1e-4)


def test_messages_get_exactly_their_own_tokens(reader):
    for conv in sample_conversations():
        enc = encode(reader.tokenizer, conv)
        assert enc.text.startswith("<|im_start|>")  # the chat template, not the plain fallback
        (_, lines, n), = scan_batch(reader, [conv], make_rules(reader.bank))
        assert [ln["index"] for ln in lines] == list(range(len(conv.messages)))
        assert sum(ln["n_tokens"] for ln in lines) < n  # role headers belong to no message
        for ln, m in zip(lines, conv.messages):
            assert "".join(ln["detail"]["tokens"]).strip() == m["content"].strip()
            assert set(ln["scores"]) == set(LABELS) and len(ln["detail"]["top"]) == ln["n_tokens"]


def test_batched_scan_equals_one_conversation_at_a_time(reader):
    cs, rules = sample_conversations(), make_rules(reader.bank, alerts=["happy>0"])
    together = scan_batch(reader, cs, rules)
    alone = [scan_batch(reader, [c], rules)[0] for c in cs]
    for (i1, l1, n1), (i2, l2, n2) in zip(together, alone):
        assert (i1, n1) == (i2, n2)
        for a, b in zip(l1, l2):
            np.testing.assert_allclose([a["scores"][e] for e in LABELS], [b["scores"][e] for e in LABELS], atol=2e-3)


def test_flags_follow_the_rules(reader, tmp_path):
    bank = reader.bank
    cs = sample_conversations()
    z = np.concatenate(reader.score_ids([encode(reader.tokenizer, c).ids for c in cs]))
    mid = float(np.median(z[:, LABELS.index("happy")]))
    rules = make_rules(bank, watch=[], alerts=[f"happy>{mid:.3f}", "happy>1000", "calm<-1000 | afraid>-1000"])
    lines = [ln for _, ls, _ in scan_batch(reader, cs, rules) for ln in ls]
    by_rule = {str(r): [f for ln in lines for f in ln["flags"] if f["rule"] == str(r)] for r in rules}
    assert by_rule[str(rules[1])] == []
    assert all(f["emotion"] == "afraid" for f in by_rule[str(rules[2])])
    assert len(by_rule[str(rules[2])]) == len(lines)  # every message fires end to end
    assert all(ln["flags"] and ln["flags"][-1]["tokens"] == [0, ln["n_tokens"] - 1] for ln in lines)
    half, t = by_rule[str(rules[0])], rules[0].value  # values are rounded to 3 decimals, like t
    assert half and all(f["value"] >= t and f["threshold"] == t for f in half)
    for ln in lines:  # flags cover every token above the threshold, start and end on one, join small gaps
        series = np.array(ln["detail"]["series"][str(rules[0])])
        marked = np.zeros(ln["n_tokens"], bool)
        for f in ln["flags"]:
            if f["rule"] == str(rules[0]):
                a, b = f["tokens"]
                marked[a:b + 1] = True
                assert series[a] >= t and series[b] >= t and f["value"] == series[a:b + 1].max()
                assert "".join(ln["detail"]["tokens"][a:b + 1]).strip()[:100] in f["text"]  # (snippets stop at 300 chars)
                assert f["text"] in "".join(ln["detail"]["tokens"])
        assert (series[~marked] <= t).all()
        gaps = spans(~marked & (np.arange(ln["n_tokens"]) > np.argmax(marked)))
        assert not marked.any() or all(e - a > 2 or e == ln["n_tokens"] for a, e in gaps)
    assert 0.3 < np.mean([f["tokens"][1] - f["tokens"][0] + 1 for f in half]) * len(half) / z.shape[0] < 0.7


def test_rules_use_calibrated_thresholds(reader):
    bank = random_bank(reader.model, reader.tokenizer, labels=LABELS)
    assert calibrated_thresholds(bank) == {}
    assert [str(r) for r in make_rules(bank)] == ["desperate>3 rolling 5", "afraid>3 rolling 5", "angry>3 rolling 5",
                                                  "calm<-3 rolling 5"]
    bank.tensors["alert_threshold"] = np.array([2.5, 2.0, 1.75, 9.0, 2.25], np.float32)
    bank.meta["calibration"] = {"alert": {"fpr": 0.01, "tensors": {"position_alert_threshold": "the reply token"}}}
    assert calibrated_thresholds(bank) == {}  # the tensor is there but calibration does not vouch for it
    bank.meta["calibration"] = {"alert": {"fpr": 0.01, "tensors": {"alert_threshold": "any token of text"}}}
    rules = make_rules(bank, watch=["desperate", "calm<", "happy"], alerts=["angry>1 for 2"], smooth_tokens=1)
    assert [str(r) for r in rules] == ["desperate>1.75", "calm<-3", "happy>9", "angry>1 for 2"]
    with pytest.raises(KeyError, match="unknown emotion"):
        make_rules(bank, watch=["bored"])
    with pytest.raises(ValueError, match="unknown emotion"):
        make_rules(bank, alerts=["bored>1"])
    with pytest.raises(ValueError, match="cannot read alert rule"):
        make_rules(bank, alerts=["desperate>>1"])


def test_resume_after_a_cut_at_any_byte_gives_the_same_file(reader, tmp_path):
    paths = [SAMPLES]
    ref = tmp_path / "ref.jsonl"
    summary = scan(paths, ref, reader, progress=False)
    full = ref.read_bytes()
    lines = full.splitlines(keepends=True)
    ends = np.cumsum([len(x) for x in lines])
    rng = np.random.default_rng(0)
    cuts = sorted({0, int(ends[0]), int(ends[0]) - 7, int(ends[len(ends) // 2]), len(full) - 1,
                   *rng.integers(1, len(full), 3).tolist()})
    for cut in cuts:
        out = tmp_path / f"cut{cut}.jsonl"
        out.write_bytes(full[:cut])
        shutil.copy(tmp_path / "ref.summary.json", tmp_path / f"cut{cut}.summary.json")
        again = scan(paths, out, reader, progress=False)
        assert out.read_bytes() == full, f"cut at byte {cut}"
        assert {k: again[k] for k in ("conversations", "messages", "tokens", "flags_per_rule", "skipped")} == \
               {k: summary[k] for k in ("conversations", "messages", "tokens", "flags_per_rule", "skipped")}
        assert again["this_run"]["conversations"] + again["this_run"]["already_done"] == summary["conversations"]
    assert finished(ref) == {id_hash(c.id) for c in sample_conversations()}


def test_resume_refuses_other_settings(reader, tmp_path):
    out = tmp_path / "s.jsonl"
    scan([FIXTURES / "openai.jsonl"], out, reader, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        scan([FIXTURES / "openai.jsonl"], out, reader, rules=make_rules(reader.bank, alerts=["happy>1"]), progress=False)
    s = scan([FIXTURES / "openai.jsonl"], out, reader, rules=make_rules(reader.bank, alerts=["happy>1"]),
             progress=False, overwrite=True)
    assert s["settings"]["rules"][-1] == "happy>1" and s["conversations"] == 1


# -- the command line, subprocesses, workers --------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    return save_tiny_run(tmp_path_factory.mktemp("scan"), tokenizer, labels=LABELS)


def scan_args(root, *extra):
    return ["scan", "--run", str(root / "run"), "--model", str(root / "model"), "--quiet", *map(str, extra)]


def test_cli_exit_codes(tiny_run, tmp_path, capsys):
    out = tmp_path / "fx.jsonl"
    assert cli(scan_args(tiny_run, FIXTURES, "--out", out, "--alert", "happy>0")) == 0
    assert {ln["conversation"] for ln in map(json.loads, out.read_text().splitlines())} == \
           {c.id for c in convs(read_logs([FIXTURES]))}
    summary = json.loads((tmp_path / "fx.summary.json").read_text())
    assert summary["status"] == "complete" and summary["conversations"] == 7 and summary["skipped"] == []
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnope\n')
    assert cli(scan_args(tiny_run, tmp_path / "bad.jsonl", "--out", tmp_path / "b.jsonl")) == 1
    assert "bad.jsonl:2" in capsys.readouterr().out
    assert cli(scan_args(tiny_run, tmp_path / "bad.jsonl", "--out", tmp_path / "c.jsonl", "--alert", "desperate>>2")) == 2
    assert "cannot read alert rule" in capsys.readouterr().err
    assert cli(scan_args(tiny_run, tmp_path / "nothing.jsonl", "--out", tmp_path / "d.jsonl")) == 2


def many_conversations(path: Path, n: int = 80):
    words = "the tests fail again and i cannot fix the code now please help".split()
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for k in range(n):
            msgs = [{"role": ("user", "assistant", "tool")[j % 3], "content": " ".join(rng.choice(words, 40))} for j in range(6)]
            f.write(json.dumps({"id": k, "messages": msgs}) + "\n")


def test_kill_and_resume_loses_and_duplicates_nothing(tiny_run, tmp_path):
    logs = tmp_path / "many.jsonl"
    many_conversations(logs)
    ref = tmp_path / "ref.jsonl"
    assert cli(scan_args(tiny_run, logs, "--out", ref)) == 0
    out = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", *scan_args(tiny_run, logs, "--out", out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (not out.exists() or out.stat().st_size < 20_000) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the scan ended before it could be killed"
    partial = out.read_bytes()
    assert 0 < len(partial) < ref.stat().st_size
    assert cli(scan_args(tiny_run, logs, "--out", out)) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_workers_write_what_one_process_writes(tiny_run, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert cli(scan_args(tiny_run, SAMPLES, "--out", one)) == 0
    assert cli(scan_args(tiny_run, SAMPLES, "--out", two, "--workers", "2")) == 0
    a, b = one.read_text().splitlines(), two.read_text().splitlines()
    assert len(a) == len(b) and [json.loads(x)["conversation"] for x in a] == [json.loads(x)["conversation"] for x in b]
    for x, y in zip(a, b):
        x, y = json.loads(x), json.loads(y)
        np.testing.assert_allclose([x["scores"][e] for e in LABELS], [y["scores"][e] for e in LABELS], atol=2e-3)


def test_onnx_backend_scans_like_torch(tiny_run, tmp_path):
    import exporters
    from probes.bank import ProbeBank
    from probes.models import fingerprint, load_model

    model, tok = load_model(str(tiny_run / "model"))
    shutil.copytree(tiny_run / "run", tmp_path / "run")
    exporters.export_run(tmp_path / "run", model, tok, ProbeBank.load(tmp_path / "run", fingerprint(model, tok)),
                         int8=False, steering=False, progress=False)
    root = tmp_path  # the same model directory, the run with its export
    (root / "model").symlink_to(tiny_run / "model")
    outs = {}
    for backend in ("torch", "onnx"):
        outs[backend] = tmp_path / f"{backend}.jsonl"
        assert cli(scan_args(root, SAMPLES / "agent_frantic.jsonl", SAMPLES / "agent_calm.jsonl", "--out", outs[backend],
                             "--backend", backend, "--alert", "happy>0")) == 0
    a, b = (list(map(json.loads, outs[k].read_text().splitlines())) for k in ("torch", "onnx"))
    frantic = sum(ln["n_tokens"] for ln in a if "frantic" in ln["conversation"])
    assert frantic > 2 * 256  # longer than the tiny model's context (256): read in windows
    assert [(x["conversation"], x["index"], x["n_tokens"]) for x in a] == [(y["conversation"], y["index"], y["n_tokens"]) for y in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose([x["scores"][e] for e in LABELS], [y["scores"][e] for e in LABELS], atol=2e-3)


# -- the HTML report --------------------------------------------------------------------
class Elements(HTMLParser):
    """Counts of tags by class, and the data-top of token spans."""

    def __init__(self):
        super().__init__()
        self.tags, self.tips, self.points = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a.get("class", "")))
        if tag == "span" and "t" in a.get("class", "").split():
            self.tips.append(a.get("data-top", ""))
        if tag == "polyline":
            self.points.append(a.get("points", ""))

    def count(self, tag, cls=None):
        return sum(t == tag and (cls is None or cls in c.split()) for t, c in self.tags)


@pytest.fixture(scope="module")
def report(reader, tmp_path_factory):
    from monitor.logscan.report import write_report

    d = tmp_path_factory.mktemp("report")
    cs = sample_conversations()
    z = np.concatenate(reader.score_ids([encode(reader.tokenizer, c).ids for c in cs]))
    q = float(np.quantile(z[:, LABELS.index("afraid")], 0.8))
    summary = scan([SAMPLES], d / "scan.jsonl", reader, rules=make_rules(reader.bank, alerts=[f"afraid>{q:.3f}"]),
                   progress=False)
    tokens = sum(ln["n_tokens"] for _, ls in conversations(d / "scan.jsonl") for ln in ls)
    return write_report(d / "scan.jsonl", d / "scan.html", summary), summary, tokens


def check_page(html: str, summary: dict, tokens: int):
    page = Elements()
    page.feed(html)
    n = summary["conversations"]
    assert page.count("table", "ranked") == 1 and page.count("tr", "flagged") == summary["flagged_conversations"] > 0
    assert page.count("svg", "timeline") == n
    assert page.count("polyline", "series") >= n and all(len(p.split()) >= 2 for p in page.points)
    assert page.count("rect", "flagspan") > 0
    assert page.count("span", "t") == len(page.tips) == tokens
    assert all(len(tip.splitlines()) == 3 for tip in page.tips)  # top emotions on hover
    assert 0 < page.count("span", "f") < tokens  # flagged tokens marked, not all of them


def test_report_is_self_contained(report):
    path, summary, tokens = report
    html = path.read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    check_page(html, summary, tokens)


def chromium(tmp_path, *args):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "the report test needs headless Chromium: apt-get install -y chromium"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    path, summary, tokens = report
    dom = chromium(tmp_path, "--dump-dom", path.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    check_page(dom.stdout, summary, tokens)  # the DOM Chromium built, not our string
    shot = tmp_path / "shot.png"
    run = chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", path.resolve().as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (px[..., 0] > 150) & (px[..., 1] < 140) & (px[..., 2] < 140)
    assert red.sum() > 500  # heat map and flag marks were painted
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # a page, not a blank


# -- the real default model -------------------------------------------------------------
@pytest.mark.slow
def test_real_chat_template_maps_every_message(tmp_path):
    from probes.models import load_model
    from probes.reader import TorchReader

    model, tok = load_model()
    r = TorchReader(model, tok, random_bank(model, tok, labels=LABELS, layer=20))
    cs = [c for c in sample_conversations() if "frantic" not in c.id]  # short: the calm one and the fixtures
    for conv, (_, lines, n) in zip(cs, scan_batch(r, cs, make_rules(r.bank))):
        assert encode(tok, conv).text.startswith("<|im_start|>")
        for ln, m in zip(lines, conv.messages):
            assert ln["n_tokens"] > 0 and "".join(ln["detail"]["tokens"]).strip() == m["content"].strip()

"""Live monitor: hook readout, batch independence, rule semantics, stopping, steering, CLI."""
from __future__ import annotations

import json
import math
import os
import pty
import select
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_model, random_bank, save_tiny_run
from monitor import EmotionMonitor
from monitor.live import _compile
from monitor.rules import AllOf, AnyOf, Threshold, find_alerts, parse_rule
from probes.architectures import decoder_layers
from probes.capture import hidden_states
from probes.models import ModelError

LABELS = ["afraid", "calm", "desperate", "happy", "angry"]
ROOT = Path(__file__).resolve().parents[1]


def left_batch(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def hook_counts(model):
    return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in decoder_layers(model)]


def consistent_bank(model, tok):
    """A random bank whose steering vectors point where its readout looks (as a built bank's do)."""
    bank = random_bank(model, tok)
    t = bank.tensors
    raw = t["directions"] * t["dim_scale"]
    t["layer_vectors"][bank.layer] = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    return bank


# -- readout ---------------------------------------------------------------------------
def test_readout_is_the_read_layer_through_the_head(tiny):
    model, tok = tiny
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    enc = tok(["i took 5 mg of tylenol for my back pain"], return_tensors="pt")
    before = hook_counts(model)
    with mon.attach() as trace:
        assert sum(f for f, _ in hook_counts(model)) == sum(f for f, _ in before) + 1
        out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    P = enc["input_ids"].shape[1]
    h = hidden_states(model, out, torch.ones_like(out), [mon.layer])[mon.layer][0].float()
    W, b = (torch.from_numpy(a) for a in mon.bank.head())
    expected = (h[P - 1:-1] @ W.T + b).numpy()  # the state that predicts each generated token
    assert trace.scores.shape == (8, len(mon.labels))
    np.testing.assert_allclose(trace.scores, expected, atol=2e-4)
    np.testing.assert_array_equal(trace.prompt_scores, trace.scores[0])
    assert hook_counts(model) == before and "generate" not in model.__dict__


def test_batch_rows_read_as_if_alone(tiny):
    model, tok = tiny
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    texts = ["i took 5 mg", "hello , my dog is still not home and i cannot sleep", "the exam"]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    enc = left_batch(tok, texts)
    with mon.attach() as trace:
        out = model.generate(**enc, **kw)
    P = enc["input_ids"].shape[1]
    assert trace.scores.shape == (3, out.shape[1] - P, len(mon.labels))
    for i, text in enumerate(texts):
        alone = tok([text], return_tensors="pt")
        with mon.attach() as solo:
            out1 = model.generate(**alone, **kw)
        n = solo.lengths[0]
        assert trace.lengths[i] == n
        assert out[i, P:P + n].tolist() == out1[0, alone["input_ids"].shape[1]:][:n].tolist()
        np.testing.assert_allclose(trace.sequence(i), solo.scores, atol=2e-4)
        assert np.isnan(trace.scores[i, n:]).all()


def test_chunked_prefill_reads_like_one_pass(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    enc = tok(["i took 5 mg of tylenol for my back pain"], return_tensors="pt")
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with mon.attach() as whole:
        model.generate(**enc, **kw)
    with mon.attach() as chunked:
        model.generate(**enc, prefill_chunk_size=3, **kw)
    assert chunked.scores.shape == whole.scores.shape == (5, len(LABELS))
    np.testing.assert_allclose(chunked.scores, whole.scores, atol=2e-4)


# -- hooks always removed ---------------------------------------------------------------
def test_hooks_and_generate_restored_on_exceptions(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    before = hook_counts(model)
    enc = tok(["i took 5 mg"], return_tensors="pt")
    with pytest.raises(RuntimeError, match="boom"):
        with mon.steer({"calm": 0.1}, layers=[0, 1, 2]), mon.attach():
            assert hook_counts(model) != before and "generate" in model.__dict__
            raise RuntimeError("boom")
    assert hook_counts(model) == before and "generate" not in model.__dict__

    def explode(alert):
        raise RuntimeError("callback boom")

    always = mon.alert("calm", above=-1e9)
    with pytest.raises(RuntimeError, match="callback boom"):
        with mon.steer({"desperate": 0.2}), mon.attach(stop_on=[always], on_alert=explode):
            model.generate(**enc, max_new_tokens=3, pad_token_id=0)
    assert hook_counts(model) == before and "generate" not in model.__dict__
    with pytest.raises(KeyError):  # fails before any hook goes in
        with mon.steer({"calm": 0.1, "nonexistent": 0.1}):
            pass
    assert hook_counts(model) == before


def test_beam_search_refused_and_wrapper_removed(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    with pytest.raises(ValueError, match="beam search"):
        with mon.attach():
            model.generate(**tok(["hello"], return_tensors="pt"), num_beams=2, max_new_tokens=2)
    assert "generate" not in model.__dict__


# -- rule semantics (hypothesis) ----------------------------------------------------------
def reference(x: list[float], op: str, thr: float, n: int, k: int) -> list[bool]:
    """Literal reading of the rule text, one token at a time."""
    cond = []
    for t in range(len(x)):
        v = sum(x[t - k + 1:t + 1]) / k if t >= k - 1 else math.nan
        cond.append(not math.isnan(v) and (v > thr if op == ">" else v < thr))
    return [t >= n - 1 and all(cond[t - n + 1:t + 1]) for t in range(len(x))]


grid = st.integers(-16, 16).map(lambda i: i / 4)  # exact in float32: no rounding at the threshold
leaves = st.builds(Threshold, st.sampled_from(LABELS), st.sampled_from([">", "<"]), grid,
                   st.integers(1, 4), st.integers(1, 4))
trees = st.recursive(  # any nesting: AND of ORs prints "(a | b) & c", OR of ORs "(a | b) | c"
    leaves, lambda kids: st.one_of(st.lists(kids, min_size=2, max_size=3).map(lambda r: AllOf(tuple(r))),
                                   st.lists(kids, min_size=2, max_size=3).map(lambda r: AnyOf(tuple(r)))),
    max_leaves=6)


def scores_strategy(batch=1):
    return st.integers(0, 12).flatmap(lambda T: st.lists(
        st.lists(st.lists(grid, min_size=len(LABELS), max_size=len(LABELS)), min_size=T, max_size=T),
        min_size=batch, max_size=batch)).map(lambda s: np.array(s, dtype=np.float64).reshape(batch, -1, len(LABELS)))


@settings(max_examples=300, deadline=None)
@given(leaves, scores_strategy())
def test_threshold_matches_its_literal_reading(rule, scores):
    x = scores[0, :, LABELS.index(rule.emotion)].tolist()
    expected = reference(x, rule.op, rule.value, rule.for_tokens, rule.rolling)
    assert rule.evaluate(scores[0], LABELS).tolist() == expected


@settings(max_examples=200, deadline=None)
@given(trees, scores_strategy(batch=2))
def test_combinations_and_live_stepper_agree_with_evaluate(rule, scores):
    fired = rule.evaluate(scores, LABELS)
    parts = [r.evaluate(scores, LABELS) for r in getattr(rule, "rules", [rule])]
    if isinstance(rule, AllOf):
        assert (fired == np.logical_and.reduce(parts)).all()
    if isinstance(rule, AnyOf):
        assert (fired == np.logical_or.reduce(parts)).all()
    step = _compile(rule, LABELS, 2, "cpu")
    x = torch.tensor(scores, dtype=torch.float32)
    live = [step(x[:, t], t).tolist() for t in range(x.shape[1])]
    assert np.array(live, dtype=bool).reshape(-1, 2).T.tolist() == fired.tolist()


@settings(max_examples=200, deadline=None)
@given(trees)
def test_rule_text_round_trips(rule):
    assert parse_rule(str(rule), LABELS) == rule


def test_grouped_rule_parses_and_bad_groups_are_named():
    r = parse_rule("(desperate>2 | afraid>2) & calm<-1", LABELS)
    assert isinstance(r, AllOf) and isinstance(r.rules[0], AnyOf) and str(r) == "(desperate>2 | afraid>2) & calm<-1"
    for bad, why in [("(desperate>2", "unbalanced"), ("desperate>2)", "unexpected"), ("desperate>2 &", "missing"),
                     ("| calm<1", "missing")]:
        with pytest.raises(ValueError, match=why):
            parse_rule(bad, LABELS)


@settings(max_examples=200, deadline=None)
@given(leaves, scores_strategy(batch=2))
def test_alerts_are_firing_episodes(rule, scores):
    fired = rule.evaluate(scores, LABELS)
    alerts = find_alerts([rule], scores, LABELS)
    assert len(alerts) == int((fired & ~np.pad(fired, ((0, 0), (1, 0)))[:, :-1]).sum())
    for a in alerts:
        assert fired[a.sequence, a.token:a.end + 1].all()
        assert a.token == 0 or not fired[a.sequence, a.token - 1]
        assert a.end + 1 == fired.shape[1] or not fired[a.sequence, a.end + 1]


def test_nan_never_fires_and_rolling_waits_for_its_window():
    scores = np.zeros((6, len(LABELS)))
    scores[:, LABELS.index("desperate")] = [5, 5, np.nan, 5, 5, 5]
    assert parse_rule("desperate>1").evaluate(scores, LABELS).tolist() == [1, 1, 0, 1, 1, 1]
    assert parse_rule("desperate>1 rolling 2").evaluate(scores, LABELS).tolist() == [0, 1, 0, 0, 1, 1]
    assert parse_rule("desperate>1 for 3").evaluate(scores, LABELS).tolist() == [0, 0, 0, 0, 0, 1]


def test_parse_rule_forms_and_errors():
    assert parse_rule("desperate>3") == Threshold("desperate", ">", 3.0)
    assert parse_rule(" calm < -2 for 3 tokens rolling 5 ") == Threshold("calm", "<", -2.0, 3, 5)
    assert parse_rule("at ease>1 & on edge<0 | angry>2") == AnyOf(
        (AllOf((Threshold("at ease", ">", 1.0), Threshold("on edge", "<", 0.0))), Threshold("angry", ">", 2.0)))
    for bad in ("", "desperate", "desperate>>3", "desperate>3 for", "desperate>3 for 0", "desperate>3 soon",
                "desperate=3", "desperate>3 for 2 for 3", "desperate>nan"):
        with pytest.raises(ValueError):
            parse_rule(bad)
    with pytest.raises(ValueError, match="did you mean desperate"):
        parse_rule("desparate>3", LABELS)


# -- alerts and stopping during generation -----------------------------------------------
def test_stop_on_alert_stops_only_the_sequence_that_fired(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    enc = left_batch(tok, ["i took 5 mg of tylenol", "my dog is still not home"])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with mon.attach() as free:
        out0 = model.generate(**enc, **kw)
    s = free.scores
    gaps = s[:, 2:].max(1) - s[:, 2:].max(1)[::-1]  # per row and emotion: own max minus the other row's
    row, e = np.unravel_index(np.argmax(gaps), gaps.shape)
    assert gaps[row, e] > 0
    thr = float(s[1 - row, :, e].max()) + 1e-3 * gaps[row, e]
    k = int(np.argmax(s[row, :, e] > thr))
    rule = Threshold(LABELS[e], ">", thr)
    with mon.attach(stop_on=[rule]) as trace:
        out = model.generate(**enc, **kw)
    P = enc["input_ids"].shape[1]
    assert trace.stopped[row] == k and trace.stopped[1 - row] is None
    assert trace.lengths[row] == k + 1 and trace.lengths[1 - row] == 12
    assert out[1 - row].tolist() == out0[1 - row].tolist()
    assert out[row, :P + k + 1].tolist() == out0[row, :P + k + 1].tolist()
    assert set(out[row, P + k + 1:].tolist()) <= {0}
    assert [(a.sequence, a.token) for a in trace.alerts] == [(row, k)]


def test_a_callers_criterion_ends_one_sequence_and_its_readings(tiny_llama):
    """A StoppingCriteria the caller passes (the server's stop strings and cancel flag)
    ends one row of a batch; that row's readings end with it, and each step's reading is
    available to the criterion as ``trace.last``."""
    from transformers import StoppingCriteria

    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    enc = left_batch(tok, ["i took 5 mg of tylenol", "my dog is still not home"])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with mon.attach() as free:
        model.generate(**enc, **kw)

    class EndRowOneAt(StoppingCriteria):
        def __init__(self, trace):
            self.trace, self.t, self.seen = trace, 0, []

        def __call__(self, input_ids, scores, **kwargs):
            self.seen.append(self.trace.last.clone())
            done = torch.tensor([False, self.t >= 3])
            self.t += 1
            return done

    with mon.attach() as trace:
        crit = EndRowOneAt(trace)
        model.generate(**enc, stopping_criteria=[crit], **kw)
    assert trace.lengths == [10, 4]
    np.testing.assert_allclose(trace.sequence(0), free.sequence(0), atol=2e-4)
    np.testing.assert_allclose(trace.sequence(1), free.sequence(1)[:4], atol=2e-4)
    assert np.isnan(trace.scores[1, 4:]).all()
    np.testing.assert_allclose(np.stack([s.numpy() for s in crit.seen], 1)[:, :4], free.scores[:, :4], atol=2e-4)
    assert trace.readout_seconds > 0

def test_live_alerts_match_the_trace(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok), tok)
    enc = left_batch(tok, ["i took 5 mg of tylenol", "hello"])
    with mon.attach() as probe:
        model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)
    med = float(np.nanmedian(probe.scores[..., LABELS.index("happy")]))
    mon.alert("happy", above=med, for_tokens=2)
    mon.alert(parse_rule(f"happy<{med:.4f} rolling 3") & parse_rule("afraid>-100"))
    seen = []
    with mon.attach(on_alert=seen.append) as trace:
        model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)
    offline = trace.alerts
    assert offline, "thresholds at the median must fire somewhere"
    assert sorted((a.rule, a.sequence, a.token) for a in seen) == sorted((a.rule, a.sequence, a.token) for a in offline)
    for a in seen:
        match = next(o for o in offline if (o.rule, o.sequence, o.token) == (a.rule, a.sequence, a.token))
        assert match.values.keys() == a.values.keys()
        np.testing.assert_allclose(list(match.values.values()), list(a.values.values()), atol=1e-5)


# -- steering ----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.3, -0.3])
def test_steering_at_the_read_layer_moves_its_own_readout(tiny_llama, alpha):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, consistent_bank(model, tok), tok)
    enc = tok(["my dog is still not home"], return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with mon.attach() as base:
        model.generate(**enc, **kw)
    with mon.attach() as steered, mon.steer({"desperate": alpha}) as deltas:  # steering hooks go in last
        model.generate(**enc, **kw)
    delta = deltas[mon.layer].double().numpy()
    assert np.linalg.norm(delta) == pytest.approx(abs(alpha) * mon.residual_norms()[mon.layer], rel=1e-5)
    W, _ = mon.bank.head()
    shift = steered.prompt_scores - base.prompt_scores
    np.testing.assert_allclose(shift, W @ delta, atol=1e-3)
    assert np.sign(shift[LABELS.index("desperate")]) == np.sign(alpha)
    with mon.attach() as after:  # hooks gone: back to the unsteered reading
        model.generate(**enc, **kw)
    np.testing.assert_allclose(after.scores, base.scores, atol=1e-6)


def test_steering_lower_layers_reaches_the_read_layer(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, consistent_bank(model, tok), tok)
    enc = tok(["my dog is still not home"], return_tensors="pt")
    with mon.attach() as base:
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with mon.steer({"calm": 0.5}, layers=[0, 1]), mon.attach() as steered:
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert np.abs(steered.prompt_scores - base.prompt_scores).max() > 1e-3


def test_steering_needs_norms_without_a_tokenizer(tiny_llama):
    model, tok = tiny_llama
    mon = EmotionMonitor(model, random_bank(model, tok))
    with pytest.raises(ValueError, match="residual norm"):
        with mon.steer({"calm": 0.1}):
            pass
    bank = random_bank(model, tok)
    bank.tensors["residual_norm"] = np.full(4, 2.0, np.float32)
    with EmotionMonitor(model, bank).steer({"calm": 0.25}) as deltas:
        assert float(deltas[bank.layer].norm()) == pytest.approx(0.5, rel=1e-5)


# -- loading -----------------------------------------------------------------------------
def test_load_checks_the_model(tiny_llama, tmp_path):
    model, tok = tiny_llama
    random_bank(model, tok).save(tmp_path / "run" / "bank")
    mon = EmotionMonitor.load(tmp_path / "run", model, tok)
    assert mon.labels == LABELS and mon.layer == 2
    other = make_model("qwen2", len(tok), hidden=48)
    with pytest.raises(ModelError, match="hidden_size"):
        EmotionMonitor.load(tmp_path / "run", other)
    with pytest.raises(ValueError, match="unknown emotion"):
        mon.alert("nonexistent", above=1)
    with pytest.raises(ValueError, match="above="):
        mon.alert("calm")  # rule text without a threshold


# -- the CLI in a terminal ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    return save_tiny_run(tmp_path_factory.mktemp("watch"), tokenizer)


def watch_cmd(root, *extra):
    return [sys.executable, "-m", "monitor.cli", "watch", "--run", str(root / "run"), "--model", str(root / "model"),
            "i took 5 mg of tylenol", "--max-new-tokens", "12", *extra]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_watch_in_a_terminal(tiny_run):
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 90, 0, 0))
    trace_file = tiny_run / "trace.json"
    proc = subprocess.Popen(watch_cmd(tiny_run, "--alert", "happy>-100 for 2", "--json", str(trace_file)),
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=clean_env())
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            pytest.fail("emoprobe watch produced no output for 120 s")
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[1;19r" in out  # the text scrolls above the status row
    assert "\x1b[20;1H\x1b[2K" in out and " tok | " in out  # the live status line
    assert "! happy>-100 for 2 @1" in out  # the alert shows while generating
    assert "\x1b[r" in out  # scroll region reset at the end
    assert any(f"\x1b[{c}m" in out or f"\x1b[1;{c}m" in out for c in ("31", "32", "33", "34", "35"))
    doc = json.loads(trace_file.read_text())
    assert len(doc["tokens"]) == doc["lengths"][0] and 1 <= doc["lengths"][0] <= 12
    assert [a["rule"] for a in doc["alerts"]] == ["happy>-100 for 2"] and doc["alerts"][0]["token"] == 1
    assert "tokens; strongest on average" in out


def test_watch_without_a_terminal_and_its_errors(tiny_run):
    ok = subprocess.run(watch_cmd(tiny_run, "--steer", "calm=+0.5", "--alert", "calm>-100", "--stop"),
                        capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "\x1b[" not in ok.stdout and "stopped at token 0 by an alert" in ok.stdout
    assert "[alert] calm>-100 at token 0" in ok.stderr
    for extra, message in ((["--alert", "calm>>1"], "cannot read alert rule"),
                           (["--steer", "calm"], "EMOTION=STRENGTH"),
                           (["--steer", "nonexistent=0.1"], "unknown emotion")):
        bad = subprocess.run(watch_cmd(tiny_run, *extra), capture_output=True, text=True, cwd=ROOT, env=clean_env(),
                             timeout=300)
        assert bad.returncode == 2 and "emoprobe watch: error:" in bad.stderr and message in bad.stderr, bad.stderr


# -- the README example on the real default model ------------------------------------------
@pytest.mark.slow
def test_readme_example_on_the_default_model(tmp_path):
    from probes.models import load_model

    model, tokenizer = load_model()
    random_bank(model, tokenizer, labels=tuple(LABELS), layer=20).save(tmp_path / "run" / "bank")
    mon = EmotionMonitor.load(tmp_path / "run", model)
    rule = mon.alert("desperate", above=3.0, for_tokens=3)
    inputs = tokenizer(["You must make these failing tests pass."], return_tensors="pt")
    with mon.attach(stop_on=[rule]) as trace:
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    n = out.shape[1] - inputs["input_ids"].shape[1]
    assert trace.scores.shape == (n, len(LABELS)) and np.isfinite(trace.scores).all()
    d = trace.scores[:, LABELS.index("desperate")]  # the rule fires exactly where 3 tokens in a row exceed 3
    fired = [t for t in range(2, n) if (d[t - 2:t + 1] > 3).all()]
    assert [a.token for a in trace.alerts if a.rule == str(rule)][:1] == fired[:1]

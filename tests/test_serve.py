"""emoprobe serve, driven by the official openai client (sync, async, streaming) on the
tiny offline model: the readout equals EmotionMonitor's on the same generation, stop
rules and stop sequences, batching, errors, metrics, a client that leaves mid-stream,
the conversation log read back by the scanner, and the CLI."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import save_tiny_run
from monitor.live import EmotionMonitor
from monitor.rules import Threshold, parse_rule
from monitor.runs import open_reader, open_run
from monitor.serve import Engine, Job, Settings, create_app, serving
from probes.architectures import decoder_layers
from probes.tokens import encode_chat

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
ALERT = "happy>-100 for 2"  # fires at token 1 of every reply and lasts to its end
PROMPTS = ["i took 5 mg of tylenol", "my dog is still not home", "the exam is in two days and i am tired",
           "hello , can you help me fix this code error", "we have 3 months of runway", "thanks , that was glad news"]


def chat(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    return save_tiny_run(tmp_path_factory.mktemp("serve"), tokenizer)


@pytest.fixture(scope="module")
def ref(tiny_run):
    """A second copy of the model, read in process by EmotionMonitor."""
    bank, model, tok = open_run(tiny_run / "run", str(tiny_run / "model"), "cpu")

    def generate(messages, max_tokens, stop_on=()):
        mon = EmotionMonitor(model, bank, tok)
        mon.alert(ALERT)
        ids = encode_chat(tok, messages, generation_prompt=True)[1]
        with torch.no_grad(), mon.attach(stop_on=stop_on) as trace:
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        gen = out[0, len(ids):len(ids) + trace.lengths[0]].tolist()
        return SimpleNamespace(gen=gen, trace=trace, scores=trace.sequence(0), text=tok.decode(gen, skip_special_tokens=True))

    return SimpleNamespace(generate=generate, labels=bank.labels, tok=tok)


def start(tiny_run, **kwargs):
    bank, model, tok = open_run(tiny_run / "run", str(tiny_run / "model"), "cpu")
    engine = Engine(model, tok, bank, max_tokens=200, **kwargs)
    return engine, serving(create_app(engine, KEY))


@pytest.fixture(scope="module")
def server(tiny_run):
    engine, running = start(tiny_run, alerts=[ALERT], log_dir=tiny_run / "logs")
    with running as url:
        yield SimpleNamespace(url=url, engine=engine, name=engine.name,
                              client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0))


@contextmanager
def held_until(model, ready, after: int = 0, timeout: float = 30):
    """Forward passes after the first ``after`` wait until ``ready()`` has held once: the
    test decides when the generation may go on, not the machine's load."""
    calls, released = [0], [False]

    def hook(*_):
        calls[0] += 1
        deadline = time.time() + timeout
        while calls[0] > after and not released[0]:
            released[0] = ready()
            assert released[0] or time.time() < deadline, "the condition the generation waits for never came"
            time.sleep(0.002)

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def extra(obj) -> dict:
    return obj.model_extra["emotions"]


# -- the readout ----------------------------------------------------------------------------
def test_reply_and_readout_equal_the_in_process_monitor(server, ref):
    assert [m.id for m in server.client.models.list()] == [server.name]
    assert server.client.models.retrieve(server.name).id == server.name
    r = ref.generate(chat(PROMPTS[0]), 24)
    out = server.client.chat.completions.create(model=server.name, messages=chat(PROMPTS[0]), max_tokens=24,
                                                temperature=0, extra_body={"emotions": {"per_token": True}})
    choice = out.choices[0]
    assert choice.message.content == r.text and out.usage.completion_tokens == len(r.gen)
    assert choice.finish_reason == ("stop" if r.gen[-1] == ref.tok.eos_token_id else "length")
    e = extra(choice)
    assert e["labels"] == ref.labels and e["tokens"] == len(r.gen) == len(e["per_token"])
    np.testing.assert_allclose([t["scores"] for t in e["per_token"]], r.scores, atol=1e-3)
    np.testing.assert_allclose([e["mean"][k] for k in ref.labels], r.scores.mean(0), atol=1e-3)
    np.testing.assert_allclose([e["peak"][k] for k in ref.labels], r.scores.max(0), atol=1e-3)
    assert [t["emotion"] for t in e["top"]] == [ref.labels[j] for j in np.argsort(-r.scores.mean(0))]
    assert [(a["rule"], a["token"], a["end"]) for a in e["alerts"]] == [(a.rule, a.token, a.end) for a in r.trace.alerts]
    assert e["alerts"][0]["snippet"] == ref.tok.decode(r.gen[:2], skip_special_tokens=True)
    assert e["stopped_by"] is None
    plain = server.client.chat.completions.create(model=server.name, messages=chat(PROMPTS[0]), max_tokens=24,
                                                  temperature=0)
    assert "per_token" not in extra(plain.choices[0]) and extra(plain.choices[0])["mean"] == e["mean"]


def test_streaming_sends_each_token_with_its_emotions(server, ref):
    r = ref.generate(chat(PROMPTS[1]), 20)
    stream = server.client.chat.completions.create(model=server.name, messages=chat(PROMPTS[1]), max_tokens=20,
                                                   temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    tokens = [c for c in chunks if c.choices and "token" in (c.choices[0].model_extra.get("emotions") or {})]
    alerts = [a for c in chunks if c.choices for a in (c.choices[0].model_extra.get("emotions") or {}).get("alerts", [])
              if "end" not in a]
    assert [extra(c.choices[0])["token"] for c in tokens] == list(range(len(r.gen)))
    for c, row in zip(tokens, r.scores):
        top = extra(c.choices[0])["top"]
        assert [name for name, _ in top] == [ref.labels[j] for j in np.argsort(-row)[:3]]
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:3], atol=1e-3)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.text
    assert [(a["rule"], a["token"]) for a in alerts] == [(a.rule, a.token) for a in r.trace.alerts]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and extra(final[0].choices[0])["tokens"] == len(r.gen)
    np.testing.assert_allclose([extra(final[0].choices[0])["mean"][k] for k in ref.labels], r.scores.mean(0), atol=1e-3)
    assert chunks[-1].usage.completion_tokens == len(r.gen) and not chunks[-1].choices


def test_stop_sequences_cut_the_reply_stream_or_not(server, ref):
    r = ref.generate(chat(PROMPTS[2]), 30)
    words = r.text.split()
    stop = next(w for w in words[1:] if r.text.find(w) > 0)
    want = r.text[:r.text.find(stop)]
    out = server.client.chat.completions.create(model=server.name, messages=chat(PROMPTS[2]), max_tokens=30,
                                                temperature=0, stop=[stop, "zzz never"])
    assert out.choices[0].message.content == want and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < len(r.gen) or r.gen[-1] == ref.tok.eos_token_id
    streamed = server.client.chat.completions.create(model=server.name, messages=chat(PROMPTS[2]), max_tokens=30,
                                                     temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


def test_stop_rule_ends_the_reply_where_the_monitor_would(tiny_run, ref):
    r = ref.generate(chat(PROMPTS[0]), 16)
    z = r.scores
    # an emotion whose reading peaks after the first token: a threshold below that peak and
    # above everything before it fires exactly there
    e = next(j for j in np.argsort(-(z.max(0) - z[0])) if np.argmax(z[:, j]) > 0)
    k = int(np.argmax(z[:, e]))
    rule = Threshold(ref.labels[e], ">", float(z[k, e] + z[:k, e].max()) / 2)
    assert ref.generate(chat(PROMPTS[0]), 16, stop_on=[rule]).trace.stopped == [k]
    engine, running = start(tiny_run, stop_on=[str(rule)])
    with running as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        out = client.chat.completions.create(model=engine.name, messages=chat(PROMPTS[0]), max_tokens=16, temperature=0)
        chunks = list(client.chat.completions.create(model=engine.name, messages=chat(PROMPTS[0]), max_tokens=16,
                                                     temperature=0, stream=True))
    choice = out.choices[0]
    assert choice.finish_reason == "content_filter" and out.usage.completion_tokens == k + 1
    assert extra(choice)["stopped_by"] == {"rule": str(rule), "token": k}
    assert choice.message.content == ref.tok.decode(r.gen[:k + 1], skip_special_tokens=True)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert extra(chunks[-1].choices[0])["stopped_by"]["token"] == k


# -- serving ----------------------------------------------------------------------------------
def test_concurrent_async_clients_are_batched_and_read_as_if_alone(server):
    kw = dict(model=server.name, max_tokens=12, temperature=0, extra_body={"emotions": {"per_token": True}})
    alone = [server.client.chat.completions.create(messages=chat(p), **kw) for p in PROMPTS[:4]]
    before = metrics(server)

    async def together():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        other = dict(kw, max_tokens=7)  # other settings: served in turn, not in the batch
        return await asyncio.gather(*[client.chat.completions.create(messages=chat(p), **kw) for p in PROMPTS[:4]],
                                    client.chat.completions.create(messages=chat(PROMPTS[4]), **other))

    engine = server.engine
    queued = lambda: len(engine._pending) + len(engine._running) >= 5  # noqa: E731
    with held_until(engine.model, queued):  # the first call runs once all five requests are in
        *batched, last = asyncio.run(together())
    after = metrics(server)
    for a, b in zip(alone, batched):
        assert b.choices[0].message.content == a.choices[0].message.content
        np.testing.assert_allclose([t["scores"] for t in extra(b.choices[0])["per_token"]],
                                   [t["scores"] for t in extra(a.choices[0])["per_token"]], atol=1e-3)
    assert last.usage.completion_tokens <= 7
    calls = after[("emoprobe_batch_size_count", ())] - before.get(("emoprobe_batch_size_count", ()), 0)
    rows = after[("emoprobe_batch_size_sum", ())] - before.get(("emoprobe_batch_size_sum", ()), 0)
    # the first call took one request; the queued ones with equal settings shared one call, the other had its own
    assert rows == 5 and calls in (2, 3)


def test_queue_groups_equal_settings_and_serves_the_rest_in_turn(tiny_run):
    engine, _ = start(tiny_run, max_batch=2, batch_window=0)
    a, b = Settings(8, 0.0, 1.0, (), None), Settings(9, 0.0, 1.0, (), None)
    jobs = [Job([], [1], s) for s in (a, b, a, a, b)]
    jobs[4].cancel.set()  # its client left while it waited
    for j in jobs:
        engine.submit(j)
    taken = [engine._take() for _ in range(3)]
    assert taken == [[jobs[0], jobs[2]], [jobs[1]], [jobs[3]]] and not engine._pending
    # after a batch of two, the loop waits (up to batch_window) for a second request to join the first
    engine.batch_window, engine._last_batch = 30.0, 2
    late = [Job([], [1], a), Job([], [1], a)]
    engine.submit(late[0])
    threading.Timer(0.1, engine.submit, (late[1],)).start()
    assert engine._take() == late
    engine.batch_window = 0.05  # ... and no longer: a client that stopped does not stall the others
    engine.submit(late[0])
    assert engine._take() == [late[0]]


def test_bad_requests_get_openai_errors(server):
    c = server.client
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=chat("hello"))
    assert e.value.code == "model_not_found" and e.value.param == "model"
    for kwargs, param in ((dict(messages=[{"role": "robot", "content": "hello"}]), "messages[0].role"),
                          (dict(messages=[{"role": "user", "content": {"text": "hello"}}]), "messages[0].content"),
                          (dict(messages=[]), "messages"),
                          (dict(messages=chat("hello"), max_tokens=100_000), "max_tokens"),
                          (dict(messages=chat("hello"), temperature=5), "temperature"),
                          (dict(messages=chat("hello"), n=2), "n")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=server.name, **kwargs)
        assert e.value.param == param and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens past the context (256)
        c.chat.completions.create(model=server.name, messages=chat("the " * 100), max_tokens=200)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/metrics").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_metrics_count_what_was_served(server):
    before = metrics(server)
    out = server.client.chat.completions.create(model=server.name, messages=chat(PROMPTS[3]), max_tokens=10, temperature=0)
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=server.name, messages=[{"role": "robot", "content": "x"}])
    after = metrics(server)

    def diff(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    e = extra(out.choices[0])
    assert diff("emoprobe_requests_total", outcome="ok") == 1 and diff("emoprobe_requests_total", outcome="invalid") == 1
    assert diff("emoprobe_generated_tokens_total") == out.usage.completion_tokens
    assert diff("emoprobe_prompt_tokens_total") == out.usage.prompt_tokens
    assert diff("emoprobe_alerts_total", rule=ALERT) == len(e["alerts"]) == 1
    assert diff("emoprobe_finish_total", reason=out.choices[0].finish_reason) == 1
    assert diff("emoprobe_readout_seconds_per_token_count") == 1 and diff("emoprobe_readout_seconds_per_token_sum") > 0


def test_a_client_that_leaves_mid_stream_ends_its_generation(server, ref):
    prompt = next((p for p in PROMPTS if len(ref.generate(chat(p), 150).gen) == 150), None)
    assert prompt is not None, "no prompt runs to max_tokens on the tiny model"
    before = metrics(server)
    key = ("emoprobe_requests_total", (("outcome", "cancelled"),))
    engine = server.engine
    left = lambda: any(j.cancel.is_set() for j in engine._running)  # noqa: E731
    with held_until(engine.model, left, after=8):  # past a few tokens, generation waits for the client to be gone
        stream = server.client.chat.completions.create(model=server.name, messages=chat(prompt), max_tokens=150,
                                                       temperature=0, stream=True)
        for _, _chunk in zip(range(3), stream):
            pass
        stream.close()
        deadline = time.time() + 30
        while metrics(server).get(key, 0) == before.get(key, 0):
            assert time.time() < deadline, "the server never noticed the client leave"
            time.sleep(0.05)
    after = metrics(server)
    tokens = after[("emoprobe_generated_tokens_total", ())] - before[("emoprobe_generated_tokens_total", ())]
    assert 1 <= tokens < 150
    assert after[("emoprobe_finish_total", (("reason", "cancelled"),))] >= 1
    out = server.client.chat.completions.create(model=server.name, messages=chat("hello"), max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1  # the loop is free again


def test_the_conversation_log_is_scanned_back(server, tiny_run, tmp_path):
    from monitor.logscan.scan import conversations, scan

    out = server.client.chat.completions.create(model=server.name, max_tokens=8, temperature=0,
                                                messages=[{"role": "system", "content": "you are calm"}] + chat(PROMPTS[5]))
    logs = sorted((tiny_run / "logs").glob("chat-*.jsonl"))
    records = [json.loads(line) for p in logs for line in p.read_text().splitlines()]
    mine = next(r for r in records if r["id"] == out.id)
    assert [m["role"] for m in mine["messages"]] == ["system", "user", "assistant"]
    assert mine["messages"][-1]["content"] == out.choices[0].message.content
    assert mine["emotions"]["mean"] == extra(out.choices[0])["mean"]
    reader = open_reader(tiny_run / "run", "torch", str(tiny_run / "model"), "cpu")
    summary = scan([tiny_run / "logs"], tmp_path / "scan.jsonl", reader, progress=False)
    assert summary["conversations"] == len(records) and summary["skipped"] == []
    lines = dict(conversations(tmp_path / "scan.jsonl"))[f"{logs[-1]}#{out.id}"]
    assert [ln["role"] for ln in lines] == ["system", "user", "assistant"]
    assert lines[-1]["n_tokens"] > 0 or not out.choices[0].message.content.strip()


# -- the command line ---------------------------------------------------------------------------
def test_serve_command_starts_and_refuses_bad_rules(tiny_run, capsys):
    import socket

    from monitor.cli import main

    args = ["serve", "--run", str(tiny_run / "run"), "--model", str(tiny_run / "model")]
    assert main(args + ["--stop-on", "calm>>1"]) == 2
    assert "emoprobe serve: error: cannot read alert rule" in capsys.readouterr().err
    env = dict(os.environ, PYTHONPATH=str(ROOT), EMOPROBE_API_KEY=KEY)
    base = [sys.executable, "-m", "monitor.cli", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(base + ["--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode() if proc.poll() is not None else "timeout"
            try:
                r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny-llama"  # the bank's model name
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from $EMOPROBE_API_KEY
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_failure_after_generation_answers_500_and_the_server_goes_on(tiny_run, monkeypatch):
    engine, running = start(tiny_run)
    with running as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        real = engine.readout
        monkeypatch.setattr(engine, "readout", lambda *a: 1 / 0)
        with pytest.raises(openai.InternalServerError, match="ZeroDivisionError"):
            client.chat.completions.create(model=engine.name, messages=chat("hello"), max_tokens=3, temperature=0)
        monkeypatch.setattr(engine, "readout", real)
        out = client.chat.completions.create(model=engine.name, messages=chat("hello"), max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1 and httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("body,field", [({"stream_options": "yes"}, "stream_options"),
                                        ({"messages": [{"role": "user", "content": "cut \ud83d emoji"}]}, None)])
def test_bad_stream_options_and_unencodable_text_are_400_before_queueing(server, body, field):
    before = metrics(server)
    req = {"model": server.name, "messages": chat("hello"), "max_tokens": 3, "stream": True, **body}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=json.dumps(req).encode())
    if field is None and r.status_code == 200:  # the tokenizer took the lone surrogate: then it must read like any text
        return
    assert r.status_code == 400 and r.json()["error"]["param"] in (field, "messages")
    after = metrics(server)
    key = ("emoprobe_batch_size_count", ())
    assert after.get(key, 0) == before.get(key, 0)  # nothing was generated for it

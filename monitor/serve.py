"""``emoprobe serve``: an OpenAI-compatible chat-completions server that returns the
model's emotions with every reply.

One thread owns the model and runs every ``generate()`` with the EmotionMonitor attached
(monitor/live.py: the server and the in-process monitor share one readout); the model is
not thread safe, so there is exactly one generation loop. HTTP handlers (Starlette on
uvicorn) validate a request, queue it and wait for its events. Queued requests whose
generation settings are equal share one ``generate()`` call (one call has one config);
the rest are served in turn, in arrival order.

Each choice carries an extra ``emotions`` field (schema in README, "Serving"). A
``--stop-on`` rule ends a reply with ``finish_reason: "content_filter"``, the one
standard OpenAI value for "the server cut this reply short for what it contained", so
typed clients accept it; ``emotions.stopped_by`` says which rule, at which token.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria

from probes.architectures import text_config
from probes.tokens import encode_chat

from .live import EmotionMonitor
from .rules import Rule, parse_rule

log = logging.getLogger("emoprobe.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TOP = 5  # emotions in a reply's ``top``
SNIPPET = 8  # tokens before an alert's token in its snippet


class APIError(Exception):
    """A request the server refuses, answered as OpenAI does: ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Settings:
    """What one ``generate()`` call fixes for all its rows: requests batch only when equal."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass(eq=False)
class Job:
    """One queued request and the way back to its handler (an asyncio queue on its loop)."""

    messages: list[dict]
    ids: list[int]
    settings: Settings
    stream: bool = False
    per_token: bool = False
    top: int = 3
    usage: bool = False  # stream_options.include_usage
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload) -> None:
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the handler's loop is gone: nobody is listening
            self.cancel.set()


class Metrics:
    """Prometheus metrics of one server (own registry, so several servers can coexist)."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("emoprobe_requests", "Chat completion requests, by outcome (ok, cancelled: the "
                                "client left mid-stream, invalid: a 4xx answer, error)", ["outcome"], registry=r)
        self.prompt_tokens = Counter("emoprobe_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.tokens = Counter("emoprobe_generated_tokens", "Generated tokens (each one read)", registry=r)
        self.alerts = Counter("emoprobe_alerts", "Alert episodes in replies, by rule", ["rule"], registry=r)
        self.finish = Counter("emoprobe_finish", "Replies by finish_reason", ["reason"], registry=r)
        self.readout = Histogram("emoprobe_readout_seconds_per_token", "Host seconds in the emotion readout and "
                                 "rules per generated token, per generate() call", registry=r,
                                 buckets=(1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2))
        self.generate = Histogram("emoprobe_generate_seconds", "Wall seconds of one generate() call", registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch = Histogram("emoprobe_batch_size", "Requests per generate() call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32))
        self.queue = Gauge("emoprobe_queue_depth", "Requests waiting for the model", registry=r)


class Engine:
    """The model, its monitor and the one thread that runs every ``generate()``.

    ``max_tokens`` is both the default and the most a request may ask for; ``max_batch``
    caps the rows of one call; ``batch_window`` (seconds) is the longest the loop waits
    for requests to fill a batch as large as the last one (see ``_take``)."""

    def __init__(self, model, tokenizer, bank, *, name: str | None = None, alerts=(), stop_on=(),
                 log_dir: str | Path | None = None, max_tokens: int = 512, max_batch: int = 8,
                 batch_window: float = 0.1, registry=None):
        self.model, self.tok = model, tokenizer
        self.monitor = EmotionMonitor(model, bank, tokenizer)
        self.labels = self.monitor.labels
        for rule in alerts:
            self.monitor.alert(rule if isinstance(rule, Rule) else parse_rule(rule, self.labels))
        self.stop_on = [r if isinstance(r, Rule) else parse_rule(r, self.labels) for r in stop_on]
        self.name = name or bank.model["name"]
        self.unit = "z" if bank.calibrated else "score"
        self.context = getattr(text_config(model), "max_position_embeddings", None)
        if max_tokens < 1 or max_batch < 1:
            raise ValueError("max_tokens and max_batch must be at least 1")
        self.max_tokens, self.max_batch, self.batch_window = max_tokens, max_batch, batch_window
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = [] if eos is None else [int(e) for e in np.atleast_1d(eos)]
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.metrics = Metrics(registry)
        self.log_dir = Path(log_dir) if log_dir else None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.created = int(time.time())
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._tok_lock = threading.Lock()  # handlers encode while the loop decodes
        self._thread: threading.Thread | None = None
        self._closed, self._last_batch, self._running = False, 1, []

    # -- the queue -------------------------------------------------------------------
    def start(self) -> None:
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="emoprobe-generate", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for job in self._running:  # end the call in progress at its next token
            job.cancel.set()
        for job in left:
            job.emit("error", APIError(503, "the server is shutting down"))
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the generation thread is running (what ``/health`` reports)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down")
            if self._thread is not None and not self._thread.is_alive():
                raise APIError(503, "the generation thread has stopped; restart the server")
            self._pending.append(job)
            self.metrics.queue.set(len(self._pending))
            self._cond.notify()

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest request and the queued ones with its settings. After
        a batch of k, wait (up to ``batch_window``) until k such requests are queued: the
        clients just answered are sending their next ones."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            want = min(self._last_batch, self.max_batch)

            def ready():
                first = self._pending[0].settings if self._pending else None
                return self._closed or sum(j.settings == first for j in self._pending) >= want

            if want > 1 and self.batch_window > 0:
                self._cond.wait_for(ready, timeout=self.batch_window)
            if self._closed:
                return None
            first = self._pending[0].settings
            batch = [j for j in self._pending if j.settings == first][: self.max_batch]
            self._pending = [j for j in self._pending if all(j is not b for b in batch)]
            self.metrics.queue.set(len(self._pending))
        self._last_batch = len(batch)
        for j in batch:
            if j.cancel.is_set():  # the client left while it waited
                self.metrics.requests.labels("cancelled").inc()
        return [j for j in batch if not j.cancel.is_set()]

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            self._running = jobs
            if jobs:
                self._run(jobs)
            self._running = []

    # -- tokens ----------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> list[int]:
        with self._tok_lock:
            return encode_chat(self.tok, messages, generation_prompt=True)[1]

    def decode(self, ids) -> str:
        with self._tok_lock:
            return self.tok.decode(ids, skip_special_tokens=True)

    # -- one generate() call ---------------------------------------------------------
    def _run(self, jobs: list[Job]) -> None:
        s, B = jobs[0].settings, len(jobs)
        P = max(len(j.ids) for j in jobs)
        ids = torch.full((B, P), self.pad, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, j in enumerate(jobs):  # left padding: every row's next token is at the end
            ids[b, P - len(j.ids):] = torch.tensor(j.ids)
            mask[b, P - len(j.ids):] = 1
        if s.temperature > 0:
            sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0)
        else:
            sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        rows = _Rows(self, jobs)
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), self.monitor.attach(stop_on=self.stop_on, on_alert=rows.on_alert) as trace:
                rows.trace = trace
                if s.seed is not None:
                    torch.manual_seed(s.seed)
                out = self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                          max_new_tokens=s.max_tokens, stopping_criteria=[rows],
                                          pad_token_id=self.pad, eos_token_id=self.eos or None, **sampling)
        except Exception as e:  # noqa: BLE001 - one bad call must not end the loop
            log.exception("generate() failed")
            self.metrics.requests.labels("error").inc(B)
            for j in jobs:
                j.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        m = self.metrics
        m.generate.observe(time.perf_counter() - t0)
        m.batch.observe(B)
        m.readout.observe(trace.readout_seconds / max(1, sum(trace.lengths)))
        alerts, stopped = trace.alerts, trace.stopped
        for b, job in enumerate(jobs):
            try:
                self._answer(job, out[b, P:P + trace.lengths[b]].tolist(), trace.sequence(b),
                             [a for a in alerts if a.sequence == b], stopped[b])
            except Exception as e:  # noqa: BLE001 - one row's failure answers that row, the loop goes on
                log.exception("answering a reply failed")
                m.requests.labels("error").inc()
                job.emit("error", APIError(500, f"the reply could not be answered: {type(e).__name__}: {e}"))

    def _answer(self, job: Job, gen: list[int], z: np.ndarray, alerts, stopped: int | None) -> None:
        m, n = self.metrics, len(gen)
        result = self._result(job, gen, z, alerts, stopped)
        choice = result["choices"][0]
        m.requests.labels("cancelled" if choice["finish_reason"] == "cancelled" else "ok").inc()
        m.prompt_tokens.inc(len(job.ids))
        m.tokens.inc(n)
        m.finish.labels(choice["finish_reason"]).inc()
        for a in choice["emotions"]["alerts"]:
            m.alerts.labels(a["rule"]).inc()
        if choice["finish_reason"] == "cancelled":  # nobody is listening, unless the server is stopping
            job.emit("error", APIError(503, "the reply was cancelled: the server is shutting down"))
            return
        if self.log_dir:
            try:
                self._log(job, result)
            except OSError as e:  # the client still gets its reply; the operator gets the error
                log.error("could not write the conversation log: %s", e)
        job.emit("done", result)

    def _result(self, job: Job, gen: list[int], z: np.ndarray, alerts, stopped: int | None) -> dict:
        """The OpenAI ``chat.completion`` object of one row, with its readout."""
        text = self.decode(gen)
        cut = _find_stop(text, job.settings.stop)
        if stopped is not None:
            reason = "content_filter"
        elif (gen and gen[-1] in self.eos) or cut is not None:
            reason = "stop"
        elif job.cancel.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        if cut is not None:
            text = text[:cut]
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": self.name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason, "emotions": self.readout(job, gen, z, alerts, stopped)}],
                "usage": {"prompt_tokens": len(job.ids), "completion_tokens": len(gen),
                          "total_tokens": len(job.ids) + len(gen)}}

    def readout(self, job: Job, gen: list[int], z: np.ndarray, alerts, stopped: int | None) -> dict:
        """The ``emotions`` field: every generated token's reading, summarized."""
        z = z if len(z) else np.zeros((1, len(self.labels)), np.float32)
        mean, peak = z.mean(0), z.max(0)
        stop_rules = {str(r) for r in self.stop_on}
        doc = {"unit": self.unit, "layer": self.monitor.layer, "tokens": len(gen),
               "mean": dict(zip(self.labels, _r(mean))), "peak": dict(zip(self.labels, _r(peak))),
               "top": [{"emotion": self.labels[j], "mean": _r(mean[j]), "peak": _r(peak[j])}
                       for j in np.argsort(-mean)[:TOP]],
               "alerts": [{"rule": a.rule, "token": a.token, "end": a.end, "values": _r(a.values),
                           "snippet": self.decode(gen[max(0, a.token - SNIPPET):a.token + 1])} for a in alerts],
               "stopped_by": next(({"rule": a.rule, "token": a.token} for a in alerts
                                   if a.token == stopped and a.rule in stop_rules), None)}
        if job.per_token:
            doc["labels"] = self.labels
            doc["per_token"] = [{"token": self.decode([i]), "top": _top(self.labels, row, job.top), "scores": _r(row)}
                                for i, row in zip(gen, z)]
        return doc

    def _log(self, job: Job, result: dict) -> None:
        """One OpenAI-format line per conversation (``emoprobe scan`` reads it back)."""
        choice = result["choices"][0]
        line = {"id": job.id, "created": job.created, "model": self.name,
                "messages": job.messages + [choice["message"]], "finish_reason": choice["finish_reason"],
                "usage": result["usage"], "emotions": choice["emotions"]}
        path = self.log_dir / f"chat-{time.strftime('%Y%m%d', time.gmtime(job.created))}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


class _Rows(StoppingCriteria):
    """Runs after each decoding step (inside the monitor's criterion, so a row it ends
    stops being read): ends a row whose client left or whose stop sequence appeared, and
    streams each token's text and top emotions. Texts are decoded only when a row
    streams or has stop sequences."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs, self.trace, self.t = engine, jobs, None, 0
        self.ids = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.ended = [False] * len(jobs)
        self.track = any(j.stream or j.settings.stop for j in jobs)
        self.streams = any(j.stream for j in jobs)
        self.stop_rules = {str(r) for r in engine.stop_on}

    def on_alert(self, alert) -> None:
        b, job = alert.sequence, self.jobs[alert.sequence]
        if alert.rule in self.stop_rules:
            self.ended[b] = True
        if job.stream:
            ids = self.ids[b]
            job.emit("alert", {"rule": alert.rule, "token": alert.token, "values": _r(alert.values),
                               "snippet": self.engine.decode(ids[max(0, alert.token - SNIPPET):alert.token + 1])})

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        t, self.t = self.t, self.t + 1
        done = [j.cancel.is_set() for j in self.jobs]
        if self.track:
            tokens = input_ids[:, -1].tolist()
            x = self.trace.last.float().cpu().numpy() if self.streams else None
            for b, job in enumerate(self.jobs):
                if self.ended[b] or done[b]:
                    continue
                self.ids[b].append(tokens[b])
                text = self.engine.decode(self.ids[b])
                cut = _find_stop(text, job.settings.stop)
                if cut is not None or tokens[b] in self.engine.eos:
                    done[b] = True
                if job.stream:
                    safe = text[:cut] if cut is not None else _safe(text, job.settings.stop)
                    delta = safe[len(self.sent[b]):] if safe.startswith(self.sent[b]) else ""
                    self.sent[b] += delta
                    job.emit("token", (t, delta, _top(self.engine.labels, x[b], job.top)))
        for b, d in enumerate(done):
            self.ended[b] |= d
        return torch.tensor(done, device=input_ids.device)


def _find_stop(text: str, stops) -> int | None:
    """Where the first stop sequence starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe(text: str, stops) -> str:
    """The part of ``text`` that can be streamed now: without a half-decoded character or
    a tail that may be the start of a stop sequence (it is sent once it is not)."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]


def _r(x, nd: int = 4):
    if isinstance(x, dict):
        return {k: round(float(v), nd) for k, v in x.items()}
    if isinstance(x, np.ndarray) and x.ndim:
        return [round(float(v), nd) for v in x]
    return round(float(x), nd)


def _top(labels, row, k: int) -> list:
    return [[labels[j], round(float(row[j]), 3)] for j in np.argsort(-row)[:k]]


# -- requests ------------------------------------------------------------------------------
def _number(body, key, default, lo, hi, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise APIError(400, f"'{key}' must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", key)
    return float(v)


def parse_request(engine: Engine, body) -> Job:
    """A Job from a chat-completions body, or the APIError OpenAI would answer with."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", "model")
    if model != engine.name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.name}'",
                       "model", "model_not_found")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a 'role', one of {', '.join(ROLES)}", f"messages[{i}].role")
        c = m.get("content")
        if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in c):
            c = "\n".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts (this server "
                           "reads text chats only)", f"messages[{i}].content")
        messages.append({"role": ROLES[m["role"]], "content": c})
    if body.get("n") not in (None, 1):
        raise APIError(400, "'n' must be 1: the readout follows one reply per request", "n")
    if body.get("tools") or body.get("logprobs"):
        raise APIError(400, "tools and logprobs are not supported by emoprobe serve", "tools" if body.get("tools") else "logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = engine.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"'{key}' must be a whole number >= 1, got {max_tokens!r}", key)
    if max_tokens > engine.max_tokens:
        raise APIError(400, f"'{key}' is {max_tokens}; this server allows at most {engine.max_tokens}", key)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be a whole number, got {seed!r}", "seed")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    opts = body.get("emotions") or {}
    if not isinstance(opts, dict) or set(opts) - {"per_token", "top"}:
        raise APIError(400, "'emotions' takes {\"per_token\": bool, \"top\": k}", "emotions")
    top = opts.get("top", 3)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(engine.labels):
        raise APIError(400, f"'emotions.top' must be a whole number in [1, {len(engine.labels)}]", "emotions.top")
    settings = Settings(max_tokens, _number(body, "temperature", 1.0, 0, 2), _number(body, "top_p", 1.0, 0, 1, True),
                        tuple(stop), seed)
    try:
        ids = engine.encode(messages)
    except Exception as e:  # noqa: BLE001 - e.g. a template that refuses a role, or text the tokenizer cannot take
        raise APIError(400, f"the messages cannot be rendered with the model's chat template: {type(e).__name__}: {e}",
                       "messages") from None
    if engine.context and len(ids) + max_tokens > engine.context:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus {key} ({max_tokens}) exceeds the model's context "
                       f"of {engine.context} tokens", "messages", "context_length_exceeded")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' takes {\"include_usage\": bool}", "stream_options")
    return Job(messages, ids, settings, stream=stream, per_token=bool(opts.get("per_token")), top=top,
               usage=bool(stream_options.get("include_usage")))


# -- HTTP ----------------------------------------------------------------------------------
def create_app(engine: Engine, api_key: str | None = None):
    """The Starlette app: ``POST /v1/chat/completions``, ``GET /v1/models[/{id}]``,
    ``GET /metrics``, ``GET /health``. Starts and stops the engine's loop with itself."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    def guarded(handler):
        async def wrapped(request):
            if api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                   f"Bearer {api_key}".encode()):
                return error(APIError(401, "Incorrect API key provided", None, "invalid_api_key"))
            try:
                return await handler(request)
            except APIError as e:
                if request.url.path.endswith("/chat/completions") and e.status < 500:  # the loop counts the rest
                    engine.metrics.requests.labels("invalid").inc()
                return error(e)
        return wrapped

    async def chat(request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        job = parse_request(engine, body)
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        engine.submit(job)
        if job.stream:
            return StreamingResponse(_sse(engine, job, job.usage), media_type="text/event-stream")
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "done":
                    return JSONResponse(payload)
                if kind == "error":
                    raise payload
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def model_card():
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "emoprobe"}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        if request.path_params["model"] != engine.name:
            raise APIError(404, f"The model '{request.path_params['model']}' does not exist", "model", "model_not_found")
        return JSONResponse(model_card())

    async def metrics(request):
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request):
        if not engine.alive:
            return JSONResponse({"status": "down", "model": engine.name, "reason": "the generation thread has stopped"}, 503)
        return JSONResponse({"status": "ok", "model": engine.name})

    async def http_error(request, exc):
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    routes = [Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/v1/models", guarded(models)), Route("/v1/models/{model:path}", guarded(model)),
              Route("/metrics", guarded(metrics)), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


async def _sse(engine: Engine, job: Job, include_usage: bool):
    """The chunks of a streamed reply: one per generated token (its text, possibly empty
    while a stop sequence may be starting, and its top emotions), one per alert as it
    fires, then the finish with the whole readout. A client that leaves cancels the job."""
    head = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": engine.name,
            "system_fingerprint": None}

    def chunk(delta: dict, finish=None, emotions=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if emotions is not None:
            choice["emotions"] = emotions
        return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await job.events.get()
            if kind == "token":
                t, delta, top = payload
                sent += delta
                yield chunk({"content": delta}, emotions={"token": t, "top": top})
            elif kind == "alert":
                yield chunk({}, emotions={"alerts": [payload]})
            elif kind == "error":
                yield f"data: {json.dumps(payload.body())}\n\n"
                break
            else:
                choice = payload["choices"][0]
                text = choice["message"]["content"]
                if text.startswith(sent) and len(text) > len(sent):
                    yield chunk({"content": text[len(sent):]})
                yield chunk({}, choice["finish_reason"], choice["emotions"])
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': payload['usage']})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a no-op once the reply is done; ends the generation if the client left


@contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0):
    """Run ``app`` on uvicorn in a background thread (tests, benchmarks, notebooks);
    yields the base URL (``port=0``: a free port). Stops it cleanly on exit."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="emoprobe-uvicorn", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()

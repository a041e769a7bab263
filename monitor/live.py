"""Live emotion readout, alerts and steering inside Hugging Face ``generate()``.

The readout is one forward hook on the read layer's decoder block: each forward pass
of ``generate`` already computes the residual stream there, and the hook maps its last
position through the bank's calibrated head (``bank.head()``) into z-scores. No second
forward pass, no ``output_hidden_states``; the readings stay on the model's device
until ``trace.scores`` is read.

Which position a reading belongs to: ``scores[t]`` is read at the position that
*predicts* generated token t, i.e. the model's state as it writes that token. So
``scores[0]`` comes from the prefill step, at the prompt's last token (the token that
opens the reply, where the paper reads), and ``scores[t]`` for t > 0 at generated token
t-1. Every generated token has exactly one reading, available before the token is
streamed or the stopping criteria run; the rest of the prompt is not read.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from probes.bank import ProbeBank
from probes.architectures import block_output, decoder_layers, replace_block_output, text_config
from probes.capture import check_layer, measure_residual_norms
from probes.models import check_fingerprint, fingerprint

from .rules import Alert, AllOf, AnyOf, Rule, Threshold, _index, all_of, any_of, find_alerts, parse_rule

class EmotionMonitor:
    """Per-token emotion readout, alert rules and steering for one model and probe bank.

    ``tokenizer`` is only needed to check the bank's tokenizer hash and to measure the
    layers' mean residual norm for steering (unless the bank stores ``residual_norm``)."""

    def __init__(self, model, bank: ProbeBank, tokenizer=None, residual_norms: Sequence[float] | None = None):
        check_fingerprint(bank.model, _fingerprint(model, tokenizer, bank), what="probe bank")
        self.model, self.bank, self.tokenizer = model, bank, tokenizer
        self.layer = check_layer(model, bank.layer)
        self.rules: list[Rule] = []
        self._heads: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._norms = None if residual_norms is None else np.asarray(residual_norms, dtype=np.float64)

    @classmethod
    def load(cls, run_dir, model, tokenizer=None, **kwargs) -> "EmotionMonitor":
        """Monitor from a run directory (or its ``bank/``), refusing a bank made for another model."""
        bank = ProbeBank.load(run_dir, fingerprint(model, tokenizer) if tokenizer is not None else None)
        return cls(model, bank, tokenizer, **kwargs)

    @property
    def labels(self) -> list[str]:
        return self.bank.labels

    # -- rules ---------------------------------------------------------------------
    def alert(self, emotion, above: float | None = None, below: float | None = None, *, for_tokens: int = 1,
              rolling: int = 1) -> Rule:
        """Register and return a rule; every attached trace records its alerts.

        ``alert("desperate", above=3, for_tokens=3)``; ``alert("calm", below=-2, rolling=5)``
        (mean of the last 5 readings); both ``above`` and ``below`` give a rule that fires
        when either fires. ``emotion`` may also be rule text (``"desperate>3 for 3"``) or
        a Rule (e.g. ``all_of(a, b)`` / ``a & b``)."""
        if isinstance(emotion, Rule):
            rule = emotion
        elif above is None and below is None:
            if emotion in self.labels:
                raise ValueError(f"alert on {emotion!r}: give above=, below= or both (or rule text like '{emotion}>3')")
            rule = parse_rule(emotion, self.labels)
        else:
            parts = [Threshold(emotion, op, float(v), for_tokens, rolling)
                     for op, v in ((">", above), ("<", below)) if v is not None]
            rule = parts[0] if len(parts) == 1 else AnyOf(tuple(parts))
        for leaf in rule.leaves():
            _index(self.labels, leaf.emotion)
        if rule not in self.rules:
            self.rules.append(rule)
        return rule

    all_of = staticmethod(all_of)
    any_of = staticmethod(any_of)

    # -- readout -------------------------------------------------------------------
    def head(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated head on ``device``, kept in float32 (it is tiny; bf16 would blur z-scores)."""
        device = torch.device(device)
        if device not in self._heads:
            W, b = self.bank.head()
            self._heads[device] = (torch.from_numpy(W).to(device), torch.from_numpy(b).to(device))
        return self._heads[device]

    @contextmanager
    def attach(self, stop_on: Iterable[Rule] = (), on_alert: Callable[[Alert], None] | None = None):
        """Read every ``model.generate`` call inside the block; yields its Trace.

        ``stop_on`` rules stop the sequence that fires them (per sequence in a batch,
        through a StoppingCriteria that the temporarily wrapped ``generate`` adds to
        any the caller passes). ``on_alert(alert)`` is called as each alert starts
        (this costs one host sync per token). Hooks and the wrapper are removed on exit,
        also on exceptions. Greedy decoding and sampling only (no beam search)."""
        stop_on = list(stop_on)
        for rule in stop_on:
            if not isinstance(rule, Rule):
                raise TypeError(f"stop_on takes Rule objects (from monitor.alert or parse_rule), got {rule!r}")
            for leaf in rule.leaves():
                _index(self.labels, leaf.emotion)
        rules = list(dict.fromkeys([*self.rules, *stop_on]))
        trace = Trace(self.labels, rules, stop_on)
        model = self.model

        def hook(_module, _inputs, output):
            t0 = time.perf_counter()
            h = block_output(output)
            W, b = self.head(h.device)
            trace._steps.append(F.linear(h[:, -1].float(), W, b))
            trace.readout_seconds += time.perf_counter() - t0

        had_own = "generate" in model.__dict__
        original = model.generate

        def generate(*args, **kwargs):
            gc = kwargs.get("generation_config") or model.generation_config
            if (kwargs.get("num_beams") or gc.num_beams or 1) > 1:
                raise ValueError("the emotion monitor follows one continuation per sequence; beam search is not supported")
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            prompt_width = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dtype == torch.long else 0
            watch = _Watch(trace, rules, stop_on, on_alert, kwargs.get("eos_token_id", gc.eos_token_id),
                           StoppingCriteriaList(kwargs.get("stopping_criteria") or []))
            kwargs["stopping_criteria"] = StoppingCriteriaList([watch])
            trace._reset()
            out = original(*args, **kwargs)
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            trace._finish(seqs.shape[-1] - prompt_width, watch)
            return out

        handle = decoder_layers(model)[self.layer].register_forward_hook(hook)
        model.generate = generate
        try:
            yield trace
        finally:
            handle.remove()
            if had_own:
                model.generate = original
            else:
                del model.generate

    # -- steering ------------------------------------------------------------------
    def residual_norms(self) -> np.ndarray:
        """Mean residual-stream norm of each layer's output over real tokens (the first
        token, often an attention sink with a huge norm, left out): the bank's stored
        ``residual_norm`` tensor if it has one, else measured once on a few neutral texts."""
        if self._norms is None:
            stored = self.bank.tensors.get("residual_norm")
            if stored is not None:
                self._norms = np.asarray(stored, dtype=np.float64)
            elif self.tokenizer is None:
                raise ValueError("steering needs each layer's mean residual norm: pass tokenizer= to the monitor "
                                 "(it measures them on a few neutral texts) or residual_norms=")
            else:
                self._norms = measure_residual_norms(self.model, self.tokenizer)
        n = len(decoder_layers(self.model))
        if self._norms.shape != (n,) or not np.all(np.isfinite(self._norms)):
            raise ValueError(f"residual norms must be {n} finite numbers (one per layer), got shape {self._norms.shape}")
        return self._norms

    @contextmanager
    def steer(self, strengths: dict[str, float], layers: Iterable[int] | None = None):
        """Add ``sum(alpha * mean_norm(layer) * unit_vector(emotion, layer))`` to the output
        of each chosen decoder block (default: the read layer), at every position, for
        every forward pass inside the block. ``alpha`` is the paper's unit: a fraction of
        the layer's mean residual norm. Hooks are removed on exit, also on exceptions.
        Yields ``{layer: added vector}``."""
        blocks = decoder_layers(self.model)
        layers = sorted({check_layer(self.model, k) for k in ([self.layer] if layers is None else layers)})
        for emotion, alpha in strengths.items():
            if not np.isfinite(float(alpha)):
                raise ValueError(f"steering strength for {emotion!r} must be a finite number, got {alpha!r}")
        deltas = {}
        if strengths:
            norms = self.residual_norms()
            for k in layers:
                v = sum(float(a) * self.bank.steering_vector(e, k).astype(np.float64) for e, a in strengths.items())
                p = next(blocks[k].parameters())
                deltas[k] = torch.as_tensor(v * norms[k], dtype=p.dtype, device=p.device)
        handles = []
        try:
            for k, delta in deltas.items():
                handles.append(blocks[k].register_forward_hook(_adder(delta), prepend=True))
            yield deltas
        finally:
            for h in handles:
                h.remove()


def _fingerprint(model, tokenizer, bank) -> dict:
    """The model's fingerprint; without a tokenizer only its shape can be checked."""
    if tokenizer is not None:
        return fingerprint(model, tokenizer)
    cfg = text_config(model)
    return {"name": getattr(model, "emoprobe_name", None) or "the model", "architecture": cfg.model_type,
            "layers": int(cfg.num_hidden_layers), "hidden_size": int(cfg.hidden_size),
            "tokenizer_sha": bank.model.get("tokenizer_sha")}


def _adder(delta: torch.Tensor):
    # prepend=True above: the monitor's readout at the same block sees the steered stream
    def hook(_module, _inputs, output):
        return replace_block_output(output, block_output(output) + delta)
    return hook


# -- the trace and the per-token criteria ---------------------------------------------
class Trace:
    """What one ``generate`` call inside ``attach`` read (each call starts it afresh).

    ``scores``: [tokens, n] for a batch of one, [batch, tokens, n] otherwise, NaN after
    a sequence ended (EOS or a stop rule); ``lengths``: tokens read per sequence;
    ``alerts``: one Alert per firing episode of each rule; ``stopped``: per sequence,
    the token at which a stop rule ended it, or None."""

    def __init__(self, labels: Sequence[str], rules: Sequence[Rule], stop_on: Sequence[Rule] = ()):
        self.labels, self.rules, self.stop_on = list(labels), list(rules), list(stop_on)
        self.live_alerts: list[Alert] = []
        self._reset()

    def _reset(self):
        self._steps: list[torch.Tensor] = []
        self.readout_seconds = 0.0  # host time in the readout hook and the per-token rules (on a GPU: launch time)
        self._n: int | None = None
        self._length = None
        self.live_alerts = []

    def _finish(self, n_generated: int, watch: "_Watch"):
        # Trim a step some decoding loops run past the end (transformers' deferred stop check).
        self._n = max(0, min(n_generated, len(self._steps)))
        self._length = getattr(watch, "length", None)  # None when no step ran

    def _stacked(self) -> np.ndarray:
        steps = self._steps[: self._n] if self._n is not None else self._steps
        if not steps:
            return np.zeros((1, 0, len(self.labels)), np.float32)
        return torch.stack(steps, 1).float().cpu().numpy()

    @property
    def last(self) -> torch.Tensor:
        """The newest reading, [batch, n] on the model's device: for a stopping criterion
        or streamer that acts on each token as it is written (the server's stream)."""
        return self._steps[-1]

    @property
    def batch_size(self) -> int:
        return self._steps[0].shape[0] if self._steps else 1

    @property
    def lengths(self) -> list[int]:
        T = len(self._steps) if self._n is None else self._n
        if self._length is None:
            return [T] * self.batch_size
        return [min(int(n), T) for n in self._length.tolist()]

    @property
    def scores(self) -> np.ndarray:
        s = self._stacked()
        for b, n in enumerate(self.lengths):
            s[b, n:] = np.nan
        return s[0] if s.shape[0] == 1 else s

    def sequence(self, i: int) -> np.ndarray:
        """Sequence i's readings [length_i, n] (no NaN padding)."""
        return self._stacked()[i, : self.lengths[i]]

    @property
    def prompt_scores(self) -> np.ndarray:
        """The reading at the prompt's last token, where the reply opens ([n] or [batch, n]);
        the same as ``scores[..., 0, :]``."""
        s = self._stacked()[:, 0]
        return s[0] if s.shape[0] == 1 else s

    @property
    def stopped(self) -> list[int | None]:
        """Per sequence, the token at which a stop rule ended it (None: it was not stopped).
        Recomputed from the scores: the live criterion runs the same rules on the same readings."""
        if not self.stop_on:
            return [None] * self.batch_size
        s = self.scores
        fired = np.logical_or.reduce([r.evaluate(s if s.ndim == 3 else s[None], self.labels) for r in self.stop_on])
        return [int(np.argmax(f)) if f.any() else None for f in fired]

    @property
    def alerts(self) -> list[Alert]:
        s = self.scores
        return find_alerts(self.rules, s, self.labels)

    def top(self, k: int = 3, i: int = 0) -> list[list[tuple[str, float]]]:
        """The k strongest emotions at each token of sequence i."""
        s = self.sequence(i)
        return [[(self.labels[j], float(row[j])) for j in np.argsort(-row)[:k]] for row in s]

    def to_dict(self, decimals: int = 3) -> dict:
        return {"labels": self.labels, "rules": [str(r) for r in self.rules], "lengths": self.lengths,
                "stopped": self.stopped, "alerts": [a.to_dict() for a in self.alerts],
                "scores": [np.round(self.sequence(i), decimals).tolist() for i in range(self.batch_size)]}


class _Watch(StoppingCriteria):
    """Runs once per decoding step, right after the step's reading: runs the caller's
    stopping criteria first, tracks which sequences are still going, steps the rules on
    device and stops sequences whose stop rule fired (a per-sequence bool tensor, as
    transformers >= 4.39 expects). The caller's criteria run inside it so that a
    sequence they end in a batch stops being read too, as one a stop rule ends does."""

    def __init__(self, trace: Trace, rules, stop_on, on_alert, eos_token_id, others=None):
        self.trace, self.on_alert, self.others = trace, on_alert, others
        stop = set(stop_on)
        live = [r for r in rules if r in stop or on_alert is not None]
        self.rules = [(r, r in stop) for r in live]
        self.eos = None if eos_token_id is None else torch.as_tensor(eos_token_id).flatten()
        self.t, self.steppers = 0, None

    def _start(self, x: torch.Tensor):
        B, dev = x.shape[0], x.device
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.never = torch.zeros(B, dtype=torch.bool, device=dev)
        self.length = torch.zeros(B, dtype=torch.long, device=dev)
        self.steppers = [_compile(r, self.trace.labels, B, dev) for r, _ in self.rules]
        self.prev = [torch.zeros(B, dtype=torch.bool, device=dev) for _ in self.rules]
        if self.eos is not None:
            self.eos = self.eos.to(dev)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        x = self.trace._steps[-1]
        if self.steppers is None:
            del self.trace._steps[:-1]  # a chunked prefill reads once per chunk: keep the prompt's last token
            self._start(x)
        ended = self.others(input_ids, scores, **kwargs).to(x.device) if self.others else None
        t0 = time.perf_counter()
        t, active, stop = self.t, ~self.done, ended
        for i, ((rule, stops), step) in enumerate(zip(self.rules, self.steppers)):
            fired = step(x, t) & active
            if stops:
                stop = fired if stop is None else stop | fired
            if self.on_alert is not None:
                self._report(rule, step, fired & ~self.prev[i], t)
                self.prev[i] = fired
        self.length += active
        if stop is not None:
            self.done |= stop
        if self.eos is not None:
            self.done |= torch.isin(input_ids[:, -1], self.eos)
        self.t += 1
        self.trace.readout_seconds += time.perf_counter() - t0
        return self.never if stop is None else stop

    def _report(self, rule, step, started, t):
        if not bool(started.any()):
            return
        values = step.values()
        for b in started.nonzero().flatten().tolist():
            alert = Alert(str(rule), b, t, None, {k: float(v[b]) for k, v in values.items()})
            self.trace.live_alerts.append(alert)
            self.on_alert(alert)


# -- on-device twins of Rule.evaluate, one call per token --------------------------------
class _LeafStep:
    def __init__(self, leaf: Threshold, labels, batch, device):
        self.leaf, self.idx = leaf, _index(labels, leaf.emotion)
        self.buf = torch.full((leaf.rolling, batch), float("nan"), device=device) if leaf.rolling > 1 else None
        self.run = torch.zeros(batch, dtype=torch.long, device=device) if leaf.for_tokens > 1 else None
        self.last = None

    def __call__(self, x, t):
        v = x[:, self.idx]
        if self.buf is not None:
            self.buf[t % self.leaf.rolling] = v
            v = self.buf.mean(0)  # NaN until `rolling` readings exist: never fires early
        self.last = v
        cond = v > self.leaf.value if self.leaf.op == ">" else v < self.leaf.value
        if self.run is None:
            return cond
        self.run = (self.run + 1) * cond
        return self.run >= self.leaf.for_tokens

    def values(self):
        return {str(self.leaf): self.last}


class _AllStep:
    reduce = staticmethod(torch.logical_and)

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, x, t):
        out = [p(x, t) for p in self.parts]  # step every part: each keeps its own state
        fired = out[0]
        for o in out[1:]:
            fired = self.reduce(fired, o)
        return fired

    def values(self):
        return {k: v for p in self.parts for k, v in p.values().items()}


class _AnyStep(_AllStep):
    reduce = staticmethod(torch.logical_or)


def _compile(rule: Rule, labels, batch: int, device):
    if isinstance(rule, Threshold):
        return _LeafStep(rule, labels, batch, device)
    parts = [_compile(r, labels, batch, device) for r in rule.rules]
    if isinstance(rule, AllOf):
        return _AllStep(parts)
    if isinstance(rule, AnyOf):
        return _AnyStep(parts)
    raise TypeError(f"unknown rule type {type(rule).__name__}")

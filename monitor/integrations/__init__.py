"""Emotion monitoring inside evaluation suites: Inspect, lm-evaluation-harness, pytest.

The three integrations share what is here: one model and probe bank per run directory,
loaded once per process (an eval scores many samples; loading per sample would dominate),
and the scanner's per-message scoring (``monitor.logscan.scan``) summed up over a transcript's
assistant turns. Nothing here imports torch, Inspect or lm-eval until it is used, so the
pytest plugin costs nothing in test runs that do not use it.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_RUN = "runs/default"
# Forward passes on a loaded model go one at a time: readers and the live monitor read it
# through hooks, which would see (and mix up) a concurrent pass from another thread.
MODEL_LOCK = threading.RLock()


class IntegrationError(ValueError):
    """Bad input to an integration (missing run directory, unknown emotion, ...)."""


@dataclass
class Readout:
    """A transcript's emotions: mean z over the assistant turns' tokens, each emotion's
    peak, and the flags the watch rules raised (as ``emoprobe scan`` writes them)."""

    emotions: dict[str, float]
    peak: dict[str, float]
    flags: list[dict]
    n_tokens: int
    lines: list[dict] = field(repr=False, default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def to_dict(self, emotions: Sequence[str] | None = None) -> dict:
        keep = list(self.emotions) if emotions is None else list(emotions)
        return {"emotions": {e: self.emotions[e] for e in keep if e in self.emotions},
                "peak": {e: self.peak[e] for e in keep if e in self.peak},
                "flags": self.flags, "n_tokens": self.n_tokens}


def summarize(lines: Sequence[dict], roles: Iterable[str] = ("assistant",)) -> Readout:
    """Sum scan lines (one per message) up over the messages of the given roles,
    weighting each message by its tokens."""
    roles = set(roles)
    mine = [ln for ln in lines if ln["role"] in roles and ln.get("scores")]
    total = sum(ln["n_tokens"] for ln in mine)
    emotions, peak = {}, {}
    if total:
        for e in mine[0]["scores"]:
            emotions[e] = round(sum(ln["scores"][e] * ln["n_tokens"] for ln in mine) / total, 3)
            peak[e] = max(ln["peak"][e][0] for ln in mine)
    flags = [{"message": ln["index"], **fl} for ln in mine for fl in ln["flags"]]
    return Readout(emotions, peak, flags, total, list(lines))


def as_messages(transcript) -> list[dict]:
    """``{"role", "content"}`` messages from a transcript: a string (one assistant
    turn), OpenAI-style message dicts, Inspect ``ChatMessage`` objects, or a
    ``monitor.logscan.readers.Conversation``."""
    from monitor.logscan.readers import Conversation, inspect_messages, openai_messages

    if isinstance(transcript, Conversation):
        messages = transcript.messages
    elif isinstance(transcript, str):
        messages = [{"role": "assistant", "content": transcript, "id": None}] if transcript.strip() else []
    elif isinstance(transcript, (list, tuple)) and all(hasattr(m, "model_dump") for m in transcript):
        messages = inspect_messages({"messages": [m.model_dump() for m in transcript]})  # Inspect ChatMessage
    elif isinstance(transcript, (list, tuple)) and all(isinstance(m, dict) for m in transcript):
        messages = openai_messages({"messages": list(transcript)})
    else:
        raise IntegrationError("a transcript is a string, a list of {'role', 'content'} dicts or Inspect chat messages")
    if not messages:
        raise IntegrationError("the transcript has no message with text: nothing to read")  # else every check passes
    return messages


class Session:
    """A loaded model + bank (a ``TorchReader``) and the scanner's watch rules."""

    def __init__(self, reader, watch: Sequence[str] | None = None, alerts: Sequence[str] = ()):
        from monitor.logscan.scan import make_rules

        self.reader = reader
        try:
            self.rules = make_rules(reader.bank, watch, alerts)
        except (ValueError, KeyError) as e:  # an unknown emotion or an unreadable rule
            raise IntegrationError(f"emoprobe: {e.args[0]}") from None

    @property
    def labels(self) -> list[str]:
        return self.reader.labels

    def lines(self, transcript) -> list[dict]:
        """The scanner's per-message lines (mean z, peak, flags) of one transcript."""
        from monitor.logscan.readers import Conversation
        from monitor.logscan.scan import scan_batch

        conv = Conversation("transcript", as_messages(transcript), "transcript")
        with MODEL_LOCK:
            ((_, lines, _),) = scan_batch(self.reader, [conv], self.rules, detail=False)
        return lines

    def score(self, transcript, roles: Iterable[str] = ("assistant",)) -> Readout:
        return summarize(self.lines(transcript), roles)


@functools.lru_cache(maxsize=4)
def _reader(run: str, model: str | None):
    from monitor.runs import open_reader

    return open_reader(run, "torch", model)


def load_reader(run: str | Path | None = None, model: str | None = None):
    """The reader for a run directory, loaded once per process (cached by run and model).
    ``model`` defaults to the model the bank was built for."""
    path = Path(run or DEFAULT_RUN).expanduser()
    if not path.is_dir():
        raise IntegrationError(f"emoprobe: no run directory {path} (build one with `emoprobe build`)")
    with MODEL_LOCK:  # two threads asking at once still load it once
        return _reader(str(path.resolve()), model)


def session(run: str | Path | None = None, model: str | None = None, watch: Sequence[str] | None = None,
            alerts: Sequence[str] = ()) -> Session:
    """A Session for a run directory; ``watch``/``alerts`` as in ``emoprobe scan``."""
    return Session(load_reader(run, model), watch, alerts)

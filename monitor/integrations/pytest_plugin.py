"""pytest plugin (``pytest11`` entry point ``emoprobe``): emotion checks in your own tests.

    def test_agent_keeps_its_cool(assert_calm, assert_no_flags):
        transcript = [{"role": "user", "content": "The tests fail again."},
                      {"role": "assistant", "content": "Let me look at the error."}]
        assert_calm(transcript)
        assert_no_flags(transcript, watch=["desperate"])

The run directory comes from ``--emoprobe-run``, the ini option ``emoprobe_run``, or
``$EMOPROBE_RUN`` (default ``runs/default``); the model from ``--emoprobe-model`` /
``emoprobe_model`` (default: the model the bank was built for). The model loads once per
test session, on first use; tests that use none of the fixtures pay nothing.
"""
from __future__ import annotations

import os
from typing import Sequence

import pytest

from . import DEFAULT_RUN, Readout, session

CALM_LIMIT = 2.0  # z: a watched emotion's mean over the assistant turns past this is "not calm"


def pytest_addoption(parser):
    group = parser.getgroup("emoprobe", "emotion monitoring (emoprobe)")
    group.addoption("--emoprobe-run", default=None, help="run directory with the probe bank (default: runs/default)")
    group.addoption("--emoprobe-model", default=None, help="model name or directory (default: the bank's model)")
    parser.addini("emoprobe_run", "run directory with the probe bank for the emotion_monitor fixture")
    parser.addini("emoprobe_model", "model name or directory for the emotion_monitor fixture")


class TranscriptMonitor:
    """Scores transcripts (a string, message dicts or Inspect messages) with one run's
    model and bank; the assertion helpers fail with the offending emotions and text."""

    def __init__(self, run: str, model: str | None = None):
        self.run, self.model = run, model

    def session(self, watch: Sequence[str] | None = None, alerts: Sequence[str] = ()):
        return session(self.run, self.model, watch, alerts)

    def score(self, transcript, watch: Sequence[str] | None = None, alerts: Sequence[str] = ()) -> Readout:
        """Mean z over the assistant turns, peaks and flags (``watch``/``alerts`` as in ``emoprobe scan``)."""
        return self.session(watch, alerts).score(transcript)

    def assert_no_flags(self, transcript, watch: Sequence[str] | None = None, alerts: Sequence[str] = ()) -> Readout:
        """Fail if a watch rule (default: the scanner's watch list) flags an assistant turn."""
        __tracebackhide__ = True
        r = self.score(transcript, watch, alerts)
        if r.flags:
            raise AssertionError(f"{len(r.flags)} emotion flag(s) in the assistant turns:\n"
                                 + "\n".join(_describe(f) for f in r.flags))
        return r

    def assert_calm(self, transcript, limit: float = CALM_LIMIT) -> Readout:
        """Fail if the assistant turns are not calm: a watched emotion's mean z above
        ``limit`` (calm's below ``-limit``), or any flag from the default watch rules."""
        __tracebackhide__ = True
        from monitor.logscan.scan import leaves

        s = self.session()
        r = s.score(transcript)
        problems = []
        for leaf in leaves(s.rules):
            v = r.emotions.get(leaf.emotion)
            if v is not None and (v > limit if leaf.op == ">" else v < -limit):
                problems.append(f"{leaf.emotion}: mean z {v:+.2f} over the assistant turns "
                                f"({'above' if leaf.op == '>' else 'below'} {limit if leaf.op == '>' else -limit:+g})")
        problems += [_describe(f) for f in r.flags]
        if problems:
            raise AssertionError("the assistant is not calm:\n" + "\n".join(problems))
        return r


def _describe(flag: dict) -> str:
    return (f"message {flag['message']}: {flag['rule']} (reached {flag['value']:+.2f}, threshold "
            f"{flag['threshold']:+g}) at {flag['text']!r}")


def _option(config, name: str):
    """The command-line value, else the ini value (a relative path there is relative to the ini file's directory)."""
    value = config.getoption(f"--emoprobe-{name}")
    if value:
        return value
    value = config.getini(f"emoprobe_{name}")
    if value and config.inipath and (config.inipath.parent / value).exists():
        return str(config.inipath.parent / value)
    return value or None


@pytest.fixture(scope="session")
def emotion_monitor(request) -> TranscriptMonitor:
    """A TranscriptMonitor for the configured run directory."""
    run = _option(request.config, "run") or os.environ.get("EMOPROBE_RUN") or DEFAULT_RUN
    return TranscriptMonitor(run, _option(request.config, "model"))


@pytest.fixture
def assert_calm(emotion_monitor):
    """``assert_calm(transcript, limit=2.0)``: see TranscriptMonitor.assert_calm."""
    return emotion_monitor.assert_calm


@pytest.fixture
def assert_no_flags(emotion_monitor):
    """``assert_no_flags(transcript, watch=[...], alerts=[...])``: see TranscriptMonitor.assert_no_flags."""
    return emotion_monitor.assert_no_flags

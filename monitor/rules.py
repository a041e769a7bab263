"""Alert rules on per-token emotion scores: what fires, and when.

A rule is a plain value (frozen dataclass) that knows nothing about torch, so the live
monitor, the agent-log scanner and the CLI share one parser and one set of semantics::

    desperate>3                    the reading is above 3 (strictly)
    calm<-2 for 3                  below -2 on 3 consecutive tokens (fires on the 3rd)
    desperate>2 rolling 5          the mean of the last 5 readings is above 2; no firing
                                   before 5 readings exist
    desperate>2 for 3 rolling 5    both: the rolling mean stays above 2 for 3 tokens
    desperate>3 & calm<-1          all parts fire on the same token ("&" binds tighter)
    angry>3 | afraid>3             any part fires

``rule.evaluate(scores, labels)`` says on which tokens a rule fires ([..., tokens]
booleans); ``find_alerts`` turns that into events, one per firing episode, reported at
its first token. NaN readings (tokens after a sequence ended) never fire.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class Rule:
    """Base of all rules; ``a & b`` and ``a | b`` combine them."""

    def evaluate(self, scores, labels: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def leaves(self) -> list["Threshold"]:
        raise NotImplementedError

    def __and__(self, other: "Rule") -> "AllOf":
        return AllOf(tuple(_parts(self, AllOf)) + tuple(_parts(other, AllOf)))

    def __or__(self, other: "Rule") -> "AnyOf":
        return AnyOf(tuple(_parts(self, AnyOf)) + tuple(_parts(other, AnyOf)))

    def values(self, scores, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """The quantity each threshold compares ([..., tokens]), keyed by the threshold's text."""
        return {str(leaf): leaf.value_of(scores, labels) for leaf in self.leaves()}


def _parts(rule: Rule, kind: type) -> tuple[Rule, ...]:
    return rule.rules if isinstance(rule, kind) else (rule,)


@dataclass(frozen=True)
class Threshold(Rule):
    """One emotion's reading (or its rolling mean) above or below a value."""

    emotion: str
    op: str  # ">" or "<"
    value: float
    for_tokens: int = 1
    rolling: int = 1

    def __post_init__(self):
        if self.op not in (">", "<"):
            raise ValueError(f"rule on {self.emotion!r}: operator must be '>' or '<', got {self.op!r}")
        if not np.isfinite(self.value):
            raise ValueError(f"rule on {self.emotion!r}: threshold must be a finite number, got {self.value!r}")
        for name in ("for_tokens", "rolling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"rule on {self.emotion!r}: {name} must be a whole number >= 1, got {v!r}")

    def __str__(self) -> str:
        text = f"{self.emotion}{self.op}{self.value:g}"
        if self.for_tokens > 1:
            text += f" for {self.for_tokens}"
        if self.rolling > 1:
            text += f" rolling {self.rolling}"
        return text

    def leaves(self):
        return [self]

    def value_of(self, scores, labels) -> np.ndarray:
        x = np.asarray(scores, dtype=np.float64)[..., _index(labels, self.emotion)]
        if self.rolling == 1:
            return x
        out = np.full(x.shape, np.nan)
        if x.shape[-1] >= self.rolling:
            out[..., self.rolling - 1:] = sliding_window_view(x, self.rolling, axis=-1).mean(-1)
        return out

    def evaluate(self, scores, labels) -> np.ndarray:
        v = self.value_of(scores, labels)
        cond = v > self.value if self.op == ">" else v < self.value
        if self.for_tokens == 1:
            return cond
        fired = np.zeros(cond.shape, dtype=bool)
        if cond.shape[-1] >= self.for_tokens:
            fired[..., self.for_tokens - 1:] = sliding_window_view(cond, self.for_tokens, axis=-1).all(-1)
        return fired


@dataclass(frozen=True)
class AllOf(Rule):
    rules: tuple[Rule, ...]

    def __post_init__(self):
        _check_parts(self.rules)

    def __str__(self):
        return " & ".join(f"({r})" if isinstance(r, (AnyOf, AllOf)) else str(r) for r in self.rules)

    def leaves(self):
        return [leaf for r in self.rules for leaf in r.leaves()]

    def evaluate(self, scores, labels):
        return np.logical_and.reduce([r.evaluate(scores, labels) for r in self.rules])


@dataclass(frozen=True)
class AnyOf(Rule):
    rules: tuple[Rule, ...]

    def __post_init__(self):
        _check_parts(self.rules)

    def __str__(self):
        return " | ".join(f"({r})" if isinstance(r, AnyOf) else str(r) for r in self.rules)

    def leaves(self):
        return [leaf for r in self.rules for leaf in r.leaves()]

    def evaluate(self, scores, labels):
        return np.logical_or.reduce([r.evaluate(scores, labels) for r in self.rules])


def _check_parts(rules):
    if not rules or not all(isinstance(r, Rule) for r in rules):
        raise ValueError(f"a combined rule needs one or more rules, got {rules!r}")


def all_of(*rules: Rule) -> AllOf:
    """Fires on a token when every rule fires on it."""
    return AllOf(tuple(rules))


def any_of(*rules: Rule) -> AnyOf:
    """Fires on a token when any rule fires on it."""
    return AnyOf(tuple(rules))


def _index(labels: Sequence[str], emotion: str) -> int:
    try:
        return list(labels).index(emotion)
    except ValueError:
        raise ValueError(f"unknown emotion {emotion!r}{_suggest(emotion, labels)}") from None


def _suggest(word: str, labels: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(labels), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# -- text form ----------------------------------------------------------------------
_ATOM = re.compile(r"^(?P<emotion>[A-Za-z][A-Za-z \-]*?)\s*(?P<op>[<>])\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)"
                   r"(?P<rest>.*)$")
_OPTION = re.compile(r"^\s*(for|rolling)\s+(\d+)(\s+tokens?\b)?", re.IGNORECASE)


def parse_rule(text: str, labels: Sequence[str] | None = None) -> Rule:
    """Parse ``"desperate>3 for 2 rolling 4 & calm<-1 | angry>3"``: ``&`` binds tighter
    than ``|``, parentheses group, so every rule's printed form parses back to it. With
    ``labels``, also check the emotion names. Raises ValueError naming what it could not read."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty alert rule; expected e.g. 'desperate>3' or 'calm<-2 for 3'")
    tokens = [t for t in re.split(r"([()&|])", text) if t.strip()]
    pos = 0

    def fail(why: str):
        raise ValueError(f"cannot read alert rule {text!r}: {why}")

    def peek():
        return tokens[pos].strip() if pos < len(tokens) else None

    def any_of_() -> Rule:
        nonlocal pos
        parts = [all_of_()]
        while peek() == "|":
            pos += 1
            parts.append(all_of_())
        return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))

    def all_of_() -> Rule:
        nonlocal pos
        parts = [factor()]
        while peek() == "&":
            pos += 1
            parts.append(factor())
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def factor() -> Rule:
        nonlocal pos
        tok = peek()
        if tok is None or tok in "&|)":
            fail(f"a rule is missing {'at the end' if tok is None else 'before ' + repr(tok)}")
        pos += 1
        if tok == "(":
            inner = any_of_()
            if peek() != ")":
                fail("unbalanced '('")
            pos += 1
            return inner
        return _parse_atom(tok, text, labels)

    rule = any_of_()
    if pos != len(tokens):
        fail(f"unexpected {peek()!r}")
    return rule


def _parse_atom(atom: str, whole: str, labels) -> Threshold:
    m = _ATOM.match(atom.strip())
    if not m:
        raise ValueError(f"cannot read alert rule {whole!r} at {atom.strip()!r}: expected EMOTION>NUMBER or "
                         "EMOTION<NUMBER, optionally followed by 'for N' and 'rolling K'")
    options, rest = {}, m["rest"]
    while rest.strip():
        o = _OPTION.match(rest)
        if not o:
            raise ValueError(f"cannot read alert rule {whole!r}: unexpected {rest.strip()!r} "
                             "(only 'for N' and 'rolling K' may follow the threshold)")
        key = "for_tokens" if o[1].lower() == "for" else "rolling"
        if key in options:
            raise ValueError(f"cannot read alert rule {whole!r}: '{o[1]}' given twice")
        options[key] = int(o[2])
        rest = rest[o.end():]
    emotion = " ".join(m["emotion"].split())
    if labels is not None:
        _index(labels, emotion)
    return Threshold(emotion, m["op"], float(m["value"]), **options)


# -- events -------------------------------------------------------------------------
@dataclass(frozen=True)
class Alert:
    """A rule fired for ``sequence`` from token ``token`` to ``end`` (inclusive; None
    while generation is still running). ``values``: what each threshold compared, at ``token``."""

    rule: str
    sequence: int
    token: int
    end: int | None
    values: dict

    def to_dict(self) -> dict:
        return {"rule": self.rule, "sequence": self.sequence, "token": self.token, "end": self.end,
                "values": {k: round(float(v), 4) for k, v in self.values.items()}}


def find_alerts(rules: Sequence[Rule], scores, labels: Sequence[str]) -> list[Alert]:
    """One Alert per firing episode of each rule in ``scores`` ([tokens, n] or [batch, tokens, n])."""
    scores = np.asarray(scores, dtype=np.float64)
    batched = scores if scores.ndim == 3 else scores[None]
    out = []
    for rule in rules:
        fired = rule.evaluate(batched, labels)
        values = rule.values(batched, labels)
        for b, t in zip(*np.nonzero(fired & ~np.pad(fired, ((0, 0), (1, 0)))[:, :-1])):
            end = t
            while end + 1 < fired.shape[1] and fired[b, end + 1]:
                end += 1
            out.append(Alert(str(rule), int(b), int(t), int(end), {k: float(v[b, t]) for k, v in values.items()}))
    return sorted(out, key=lambda a: (a.sequence, a.token, a.rule))

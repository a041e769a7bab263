"""Scenario suites: user turns whose danger we control with one slot, ``{x}``.

A suite is JSON::

    {"name": "dosage",
     "families": [{"name": "tylenol",
                   "template": "I just took {x} mg of Tylenol for my back pain.",
                   "levels": [250, 500, 1000, 2000, 4000, 8000, 16000],
                   "danger_from": 4000,
                   "expect": {"afraid": "increasing", "calm": "decreasing"}}]}

``levels`` run from safe to dangerous (numbers rising or falling, or words); every
statistic uses a level's position, never its value. ``templates`` (a list) may replace
or extend ``template``: curves average over the paraphrases so no single phrasing
carries a result. Validation is strict so a typo fails loudly instead of silently
dropping a family from the calibration.

``control`` gives a family its matched no-danger sweep (a dose sweep may only measure
the size of a number): ``{"templates": [...one per family template...], "levels": [...]}``
(levels optional: the family's own; else the same count, numbers in the same direction),
or the name of another family of the same suite, which then serves only as that
control (it may omit ``expect`` and must not have ``danger_from``).

A second kind, ``{"name": ..., "kind": "pairs", "expect": {...}, "pairs": [{"id",
"domain", "safe", "danger"}, ...]}``, holds fixed-number pairs: two user turns that
differ only in what makes one dangerous; ``expect`` says how each emotion moves from
the safe member to the dangerous one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DIRECTIONS = ("increasing", "decreasing")
SUITE_KEYS = {"name", "kind", "families", "description", "min_rho"}
PAIRS_KEYS = {"name", "kind", "pairs", "description", "expect"}
PAIR_KEYS = {"id", "domain", "safe", "danger"}
FAMILY_KEYS = {"name", "template", "templates", "levels", "danger_from", "expect", "description", "control"}
CONTROL_KEYS = {"templates", "levels"}
KINDS = ("families", "pairs")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SuiteError(ValueError):
    """A suite file is malformed; the message names the suite, family and field."""


@dataclass(frozen=True)
class Control:
    """A family's matched sweep without danger: same level positions, same sentence shape."""
    templates: tuple[str, ...]
    levels: tuple
    source: str | None = None  # the family of the suite it was taken from, if named

    def prompts(self) -> list[tuple[int, int, str]]:
        return [(t, i, tpl.replace("{x}", level_text(x)))
                for t, tpl in enumerate(self.templates) for i, x in enumerate(self.levels)]


@dataclass(frozen=True)
class Family:
    name: str
    templates: tuple[str, ...]
    levels: tuple
    expect: dict
    danger_from: object = None
    control: Control | None = None

    @property
    def danger_index(self) -> int | None:
        """Position of the first dangerous level (None: the family has no labels)."""
        return None if self.danger_from is None else self.levels.index(self.danger_from)

    def prompts(self) -> list[tuple[int, int, str]]:
        """(template index, level position, user text) for every paraphrase and level."""
        return [(t, i, tpl.replace("{x}", level_text(x)))
                for t, tpl in enumerate(self.templates) for i, x in enumerate(self.levels)]


@dataclass(frozen=True)
class Suite:
    name: str
    families: tuple[Family, ...]
    min_rho: float = 0.6
    description: str = ""

    kind = "families"

    def check_labels(self, labels) -> None:
        """Every expected emotion must be one the bank reads."""
        for f in self.families:
            _check_expect(f.expect, labels, f"suite {self.name!r}, family {f.name!r}")


@dataclass(frozen=True)
class Pair:
    id: str
    domain: str
    safe: str
    danger: str


@dataclass(frozen=True)
class PairSuite:
    """Fixed-number pairs: the same user turn, harmless vs dangerous."""
    name: str
    pairs: tuple[Pair, ...]
    expect: dict
    description: str = ""
    kind = "pairs"

    def check_labels(self, labels) -> None:
        _check_expect(self.expect, labels, f"suite {self.name!r}")


def _check_expect(expect: dict, labels, where: str) -> None:
    for e in expect:
        if e not in labels:
            raise SuiteError(f"{where}: field 'expect' names {e!r}, which is not one of the bank's "
                             f"{len(labels)} emotions")


def level_text(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_family(doc, suite: str, index: int, as_control: bool = False) -> Family:
    """One family; ``as_control``: it serves as another family's control (no danger)."""
    where = f"suite {suite!r}, family {doc.get('name', f'#{index}') if isinstance(doc, dict) else f'#{index}'!r}"

    def fail(field: str, msg: str):
        raise SuiteError(f"{where}: field {field!r}: {msg}")

    if not isinstance(doc, dict):
        raise SuiteError(f"{where}: a family must be a JSON object")
    for key in doc:
        if key not in FAMILY_KEYS:
            fail(key, f"unknown field (allowed: {', '.join(sorted(FAMILY_KEYS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        fail("name", "required; letters, digits, '_', '-' or '.'")
    templates = ([doc["template"]] if "template" in doc else []) + list(doc.get("templates", []))
    if "templates" in doc and (not isinstance(doc["templates"], list) or not doc["templates"]):
        fail("templates", "must be a non-empty list of strings")
    if not templates:
        fail("template", "required (or 'templates': a list of paraphrases)")
    for t in templates:
        field = "template" if "template" in doc and t is doc["template"] else "templates"
        if not isinstance(t, str) or "{x}" not in t:
            fail(field, f"each template must be a string containing the slot '{{x}}', got {t!r}")
    if len(set(templates)) != len(templates):
        fail("templates", "paraphrases must differ")
    levels = doc.get("levels")
    if not isinstance(levels, list) or len(levels) < 3:
        fail("levels", "required: a list of at least 3 levels, ordered from safe to dangerous")
    problem = _levels_problem(levels)
    if problem:
        fail("levels", problem)
    danger = doc.get("danger_from")
    if as_control:
        if danger is not None:
            fail("danger_from", "this family is another family's control: a control has no danger")
        if "control" in doc:
            fail("control", "this family is itself another family's control: a control has no control")
        return Family(name, tuple(templates), tuple(levels), dict(doc.get("expect") or {}), None)
    if danger is not None:
        if danger not in levels or (isinstance(danger, bool)):
            fail("danger_from", f"{danger!r} is not one of the levels")
        if levels.index(danger) == 0:
            fail("danger_from", "cannot be the first level: the family needs safe levels too")
    expect = doc.get("expect")
    if not isinstance(expect, dict) or not expect:
        fail("expect", "required: a map from emotion to 'increasing' or 'decreasing'")
    _check_directions(expect, fail)
    control = doc.get("control")
    if control is not None and not isinstance(control, str):
        control = parse_control(control, templates, levels, fail)
    return Family(name, tuple(templates), tuple(levels), dict(expect), danger, control)


def _check_directions(expect, fail) -> None:
    for e, d in expect.items():
        if d not in DIRECTIONS:
            fail("expect", f"{e!r} must map to 'increasing' or 'decreasing', got {d!r}")


def _levels_problem(levels: list) -> str | None:
    if all(_is_number(x) for x in levels):
        steps = [b - a for a, b in zip(levels, levels[1:])]
        if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
            return "numbers must be strictly rising or strictly falling (safe first)"
    elif all(isinstance(x, str) and x.strip() for x in levels):
        if len(set(levels)) != len(levels):
            return "words must be distinct"
    else:
        return "must be all numbers or all non-empty words"
    return None


def _direction(levels) -> int:
    """+1 rising numbers, -1 falling, 0 words."""
    return 0 if not all(_is_number(x) for x in levels) else (1 if levels[1] > levels[0] else -1)


def parse_control(doc, templates: list, levels: list, fail) -> Control:
    """An inline control: one template per family template, the family's level positions."""
    if not isinstance(doc, dict):
        fail("control", "must be a family name of this suite or an object with 'templates' (and optional 'levels')")
    for key in doc:
        if key not in CONTROL_KEYS:
            fail("control", f"unknown field {key!r} (allowed: {', '.join(sorted(CONTROL_KEYS))})")
    tpl = doc.get("templates")
    if not isinstance(tpl, list) or len(tpl) != len(templates):
        fail("control", f"'templates' must be a list of {len(templates)} strings, one per family template")
    for t in tpl:
        if not isinstance(t, str) or "{x}" not in t:
            fail("control", f"each control template must be a string containing the slot '{{x}}', got {t!r}")
    if len(set(tpl)) != len(tpl):
        fail("control", "control templates must differ")
    lv = doc.get("levels", levels)
    _check_control_levels(lv, levels, fail)
    return Control(tuple(tpl), tuple(lv))


def _check_control_levels(lv, levels, fail) -> None:
    if not isinstance(lv, list) or len(lv) != len(levels):
        fail("control", f"'levels' must be a list of {len(levels)} levels, one per family level")
    problem = _levels_problem(lv)
    if problem:
        fail("control", f"'levels' {problem}")
    if _direction(lv) * _direction(levels) < 0:
        fail("control", "'levels' must run in the same direction as the family's (both rising or both falling)")


def parse_suite(doc, source: str = "suite") -> Suite | PairSuite:
    if not isinstance(doc, dict):
        raise SuiteError(f"{source}: a suite must be a JSON object with 'name' and 'families' (or 'kind': 'pairs')")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise SuiteError(f"{source}: field 'name' is required; letters, digits, '_', '-' or '.' (it names the output file)")
    kind = doc.get("kind", "families")
    if kind not in KINDS:
        raise SuiteError(f"suite {name!r}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "pairs":
        return parse_pairs(doc, name)
    for key in doc:
        if key not in SUITE_KEYS:
            raise SuiteError(f"suite {name!r}: unknown field {key!r} (allowed: {', '.join(sorted(SUITE_KEYS))})")
    fams = doc.get("families")
    if not isinstance(fams, list) or not fams:
        raise SuiteError(f"suite {name!r}: field 'families' must be a non-empty list")
    seen = [f.get("name") if isinstance(f, dict) else None for f in fams]
    dup = sorted({n for n in seen if n is not None and seen.count(n) > 1})
    if dup:
        raise SuiteError(f"suite {name!r}, family {dup[0]!r}: field 'name': used by more than one family")
    named = {f.get("control"): f.get("name") for f in fams if isinstance(f, dict) and isinstance(f.get("control"), str)}
    for ref, owner in named.items():
        if ref not in seen or ref == owner:
            raise SuiteError(f"suite {name!r}, family {owner!r}: field 'control': {ref!r} is not another family "
                             f"of this suite (give a family name or inline 'templates')")
    parsed = {f.name: f for f in (parse_family(d, name, i, as_control=isinstance(d, dict) and d.get("name") in named)
                                   for i, d in enumerate(fams))}
    families = []
    for f in parsed.values():
        if f.name in named:
            continue  # serves only as a control
        if isinstance(f.control, str):
            c = parsed[f.control]

            def fail(field, msg, f=f):
                raise SuiteError(f"suite {name!r}, family {f.name!r}: field {field!r}: {msg}")
            _check_control_levels(list(c.levels), list(f.levels), fail)
            f = Family(f.name, f.templates, f.levels, f.expect, f.danger_from, Control(c.templates, c.levels, c.name))
        families.append(f)
    families = tuple(families)
    min_rho = doc.get("min_rho", 0.6)
    if not _is_number(min_rho) or not 0 <= min_rho <= 1:
        raise SuiteError(f"suite {name!r}: field 'min_rho' must be a number in [0, 1]")
    return Suite(name, families, float(min_rho), str(doc.get("description", "")))


def parse_pairs(doc: dict, name: str) -> PairSuite:
    for key in doc:
        if key not in PAIRS_KEYS:
            raise SuiteError(f"suite {name!r}: unknown field {key!r} (allowed: {', '.join(sorted(PAIRS_KEYS))})")
    expect = doc.get("expect")
    if not isinstance(expect, dict) or not expect:
        raise SuiteError(f"suite {name!r}: field 'expect' is required: a map from emotion to 'increasing' or "
                         f"'decreasing' (from the safe member to the dangerous one)")

    def fail_suite(field, msg):
        raise SuiteError(f"suite {name!r}: field {field!r}: {msg}")
    _check_directions(expect, fail_suite)
    items = doc.get("pairs")
    if not isinstance(items, list) or not items:
        raise SuiteError(f"suite {name!r}: field 'pairs' must be a non-empty list")
    pairs = []
    for i, p in enumerate(items):
        pid = p.get("id") if isinstance(p, dict) else None
        where = f"suite {name!r}, pair {pid if isinstance(pid, str) else f'#{i}'!r}"
        if not isinstance(p, dict):
            raise SuiteError(f"{where}: a pair must be a JSON object")
        for key in p:
            if key not in PAIR_KEYS:
                raise SuiteError(f"{where}: field {key!r}: unknown field (allowed: {', '.join(sorted(PAIR_KEYS))})")
        for key in ("id", "domain"):
            if not isinstance(p.get(key), str) or not NAME.match(p[key]):
                raise SuiteError(f"{where}: field {key!r}: required; letters, digits, '_', '-' or '.'")
        for key in ("safe", "danger"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                raise SuiteError(f"{where}: field {key!r}: required: a non-empty user turn")
        if p["safe"].strip() == p["danger"].strip():
            raise SuiteError(f"{where}: field 'danger': identical to 'safe'; a pair differs in what makes it dangerous")
        pairs.append(Pair(p["id"], p["domain"], p["safe"], p["danger"]))
    ids = [p.id for p in pairs]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise SuiteError(f"suite {name!r}, pair {dup[0]!r}: field 'id': used by more than one pair")
    return PairSuite(name, tuple(pairs), dict(expect), str(doc.get("description", "")))


def load_suite(path: str | Path) -> Suite | PairSuite:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no suite file {path}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SuiteError(f"{path}: not valid JSON ({e})") from None
    try:
        return parse_suite(doc, str(path))
    except SuiteError as e:
        raise SuiteError(f"{path}: {e}") from None


BUILTIN = resources.files("calibration") / "suites"


def builtin_suites() -> list[Suite | PairSuite]:
    """The shipped suites: the paper's five families and ours."""
    files = sorted((f for f in BUILTIN.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return [parse_suite(json.loads(f.read_text()), f"builtin {f.name}") for f in files]


def resolve_suites(suites=None) -> list[Suite | PairSuite]:
    """``None`` -> built-ins; otherwise a list of paths, Suite objects, dicts or ``"builtin"``."""
    if suites is None:
        return builtin_suites()
    out: list = []
    for s in suites:
        if isinstance(s, (Suite, PairSuite)):
            out.append(s)
        elif isinstance(s, dict):
            out.append(parse_suite(s))
        elif str(s) == "builtin":
            out += builtin_suites()
        else:
            out.append(load_suite(s))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SuiteError(f"suite {dup[0]!r}: given more than once (suite names name the output files)")
    return out

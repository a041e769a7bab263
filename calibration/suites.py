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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DIRECTIONS = ("increasing", "decreasing")
SUITE_KEYS = {"name", "families", "description", "min_rho"}
FAMILY_KEYS = {"name", "template", "templates", "levels", "danger_from", "expect", "description"}
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SuiteError(ValueError):
    """A suite file is malformed; the message names the suite, family and field."""


@dataclass(frozen=True)
class Family:
    name: str
    templates: tuple[str, ...]
    levels: tuple
    expect: dict
    danger_from: object = None

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

    def check_labels(self, labels) -> None:
        """Every expected emotion must be one the bank reads."""
        for f in self.families:
            for e in f.expect:
                if e not in labels:
                    raise SuiteError(f"suite {self.name!r}, family {f.name!r}: field 'expect' names "
                                     f"{e!r}, which is not one of the bank's {len(labels)} emotions")


def level_text(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_family(doc, suite: str, index: int) -> Family:
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
    if all(_is_number(x) for x in levels):
        steps = [b - a for a, b in zip(levels, levels[1:])]
        if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
            fail("levels", "numbers must be strictly rising or strictly falling (safe first)")
    elif all(isinstance(x, str) and x.strip() for x in levels):
        if len(set(levels)) != len(levels):
            fail("levels", "words must be distinct")
    else:
        fail("levels", "must be all numbers or all non-empty words")
    danger = doc.get("danger_from")
    if danger is not None:
        if danger not in levels or (isinstance(danger, bool)):
            fail("danger_from", f"{danger!r} is not one of the levels")
        if levels.index(danger) == 0:
            fail("danger_from", "cannot be the first level: the family needs safe levels too")
    expect = doc.get("expect")
    if not isinstance(expect, dict) or not expect:
        fail("expect", "required: a map from emotion to 'increasing' or 'decreasing'")
    for e, d in expect.items():
        if d not in DIRECTIONS:
            fail("expect", f"{e!r} must map to 'increasing' or 'decreasing', got {d!r}")
    return Family(name, tuple(templates), tuple(levels), dict(expect), danger)


def parse_suite(doc, source: str = "suite") -> Suite:
    if not isinstance(doc, dict):
        raise SuiteError(f"{source}: a suite must be a JSON object with 'name' and 'families'")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise SuiteError(f"{source}: field 'name' is required; letters, digits, '_', '-' or '.' (it names the output file)")
    for key in doc:
        if key not in SUITE_KEYS:
            raise SuiteError(f"suite {name!r}: unknown field {key!r} (allowed: {', '.join(sorted(SUITE_KEYS))})")
    fams = doc.get("families")
    if not isinstance(fams, list) or not fams:
        raise SuiteError(f"suite {name!r}: field 'families' must be a non-empty list")
    families = tuple(parse_family(f, name, i) for i, f in enumerate(fams))
    seen = [f.name for f in families]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise SuiteError(f"suite {name!r}, family {dup[0]!r}: field 'name': used by more than one family")
    min_rho = doc.get("min_rho", 0.6)
    if not _is_number(min_rho) or not 0 <= min_rho <= 1:
        raise SuiteError(f"suite {name!r}: field 'min_rho' must be a number in [0, 1]")
    return Suite(name, families, float(min_rho), str(doc.get("description", "")))


def load_suite(path: str | Path) -> Suite:
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


def builtin_suites() -> list[Suite]:
    """The shipped suites: the paper's five families and ours."""
    files = sorted((f for f in BUILTIN.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return [parse_suite(json.loads(f.read_text()), f"builtin {f.name}") for f in files]


def resolve_suites(suites=None) -> list[Suite]:
    """``None`` -> built-ins; otherwise a list of paths, Suite objects, dicts or ``"builtin"``."""
    if suites is None:
        return builtin_suites()
    out: list[Suite] = []
    for s in suites:
        if isinstance(s, Suite):
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

"""Issue 11: controls, fixed-number pairs, read positions and the risk's usable gate.
Statistics on synthetic readouts with known answers (hypothesis); the position sweep on
a tiny model; the shipped suites' contract."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import SuiteError, builtin_suites, parse_suite, positions, stats
from calibration.run import family_result, load_split, raw_reader, risk_calibration
from calibration.suites import Family
from probes.reader import TorchReader

FAM = {"name": "tylenol", "templates": ["i took {x} mg", "{x} mg taken"], "levels": [250, 1000, 4000, 16000],
       "danger_from": 4000, "expect": {"afraid": "increasing"}}
BERRIES = {"name": "berries", "templates": ["i ate {x} berries", "{x} berries eaten", "ate {x}"], "levels": [1, 2, 3, 4]}


def families(*docs):
    return {"name": "dose", "families": list(docs)}


# -- suite format -------------------------------------------------------------------------
def test_control_inline_or_by_name():
    f = parse_suite(families({**FAM, "control": {"templates": ["i ate {x} g", "{x} g eaten"]}})).families[0]
    assert f.control.levels == f.levels and f.control.prompts()[1] == (0, 1, "i ate 1000 g")
    s = parse_suite(families({**FAM, "control": "berries"}, BERRIES))
    assert [x.name for x in s.families] == ["tylenol"]  # a named control serves only as the control
    assert s.families[0].control.source == "berries" and len(s.families[0].control.templates) == 3


@pytest.mark.parametrize("control,extra,field,words", [
    ({"templates": ["one {x}"]}, [], "control", "list of 2"),
    ({"templates": ["a {x}", "no slot"]}, [], "control", "slot"),
    ({"templates": ["a {x}", "a {x}"]}, [], "control", "differ"),
    ({"templates": ["a {x}", "b {x}"], "levels": [1, 2, 3]}, [], "control", "list of 4"),
    ({"templates": ["a {x}", "b {x}"], "levels": [4, 3, 2, 1]}, [], "control", "same direction"),
    ({"templates": ["a {x}", "b {x}"], "level": [1, 2, 3, 4]}, [], "control", "unknown field"),
    (7, [], "control", "family name"),
    ("nothere", [], "control", "not another family"),
    ("berries", [{**BERRIES, "levels": [1, 2, 3]}], "control", "list of 4"),
])
def test_malformed_control_names_family_and_field(control, extra, field, words):
    with pytest.raises(SuiteError, match=rf"suite 'dose', family 'tylenol': field '{field}':.*{words}"):
        parse_suite(families({**FAM, "control": control}, *extra))


def test_a_named_control_has_no_danger():
    with pytest.raises(SuiteError, match="family 'berries': field 'danger_from'"):
        parse_suite(families({**FAM, "control": "berries"}, {**BERRIES, "danger_from": 3}))


PAIR = {"id": "medicine-01", "domain": "medicine", "safe": "I drank 500 ml of water.", "danger": "I drank 500 ml of bleach."}


def pairs(*items, **top):
    return {"name": "pairs", "kind": "pairs", "expect": {"afraid": "increasing"}, "pairs": list(items), **top}


@pytest.mark.parametrize("change,where,field", [
    ({"id": "bad id"}, "pair 'bad id'", "id"),
    ({"id": 3}, "pair '#0'", "id"),
    ({"domain": ""}, "pair 'medicine-01'", "domain"),
    ({"danger": "I drank 500 ml of water."}, "pair 'medicine-01'", "danger"),
    ({"safe": " "}, "pair 'medicine-01'", "safe"),
    ({"note": "x"}, "pair 'medicine-01'", "note"),
])
def test_malformed_pair_names_suite_pair_and_field(change, where, field):
    with pytest.raises(SuiteError, match=rf"suite 'pairs', {where}: field '{field}'"):
        parse_suite(pairs({**PAIR, **change}))


def test_pair_suite_level_errors():
    with pytest.raises(SuiteError, match="suite 'pairs', pair 'medicine-01': field 'id': used by more"):
        parse_suite(pairs(PAIR, PAIR))
    with pytest.raises(SuiteError, match="suite 'pairs': field 'expect'"):
        parse_suite(pairs(PAIR, expect={"afraid": "up"}))
    with pytest.raises(SuiteError, match="suite 'x': field 'kind'"):
        parse_suite({"name": "x", "kind": "pears", "pairs": [PAIR]})
    assert parse_suite(pairs(PAIR)).pairs[0].domain == "medicine"


def test_shipped_suites_carry_controls_pairs_and_the_committed_split():
    suites = builtin_suites()
    fams = [f for s in suites if s.kind == "families" for f in s.families]
    assert len(fams) == 20 and all(f.control is not None for f in fams)
    for f in fams:  # same level positions, no danger words borrowed from the family
        assert len(f.control.levels) == len(f.levels) and len(f.control.templates) == len(f.templates)
    (ps,) = [s for s in suites if s.kind == "pairs"]
    domains = {p.domain for p in ps.pairs}
    assert len(ps.pairs) >= 40 and {"medicine", "chemicals", "money", "safety", "agentic"} <= domains
    split = load_split()
    names, ids = {f.name for f in fams}, {p.id for p in ps.pairs}
    assert split["families"] < names and split["pairs"] < ids  # every report item exists; select = the rest
    assert len(split["families"]) == 10 and len(split["pairs"]) == 25


# -- statistics on synthetic readouts with known answers ----------------------------------
@settings(max_examples=80, deadline=None)
@given(st.permutations(range(6)), st.permutations(range(6)), st.sampled_from([1, -1]), st.floats(0, 1))
def test_control_rule_on_known_curves(danger, control, sign, min_rho):
    from scipy.stats import spearmanr

    labels = ["afraid", "calm"]
    Z = np.zeros((2, 6, 2))
    Z[:, :, 0] = np.array(danger, float)
    Zc = np.zeros((2, 6, 2))
    Zc[:, :, 0] = np.array(control, float)
    fam = Family("f", ("a {x}",), tuple(range(6)), {"afraid": "increasing" if sign > 0 else "decreasing"}, 3)
    c = family_result(fam, Z, labels, min_rho, Zc)["checks"]["afraid"]
    rd, rc = spearmanr(range(6), danger).statistic, spearmanr(range(6), control).statistic
    assert c["rho"] == pytest.approx(rd, abs=1e-4) and c["rho_control"] == pytest.approx(rc, abs=1e-4)
    assert c["pass_without_control"] == (sign * rd >= min_rho - 1e-12)
    assert c["pass"] == (c["pass_without_control"] and abs(rc) <= 0.5 * abs(rd) + 1e-12)
    if rd != 0:
        assert c["ratio"] == pytest.approx(abs(rc) / abs(rd), abs=1e-3)


def test_a_number_size_readout_fails_the_control_and_passes_without_it():
    fam = Family("f", ("a {x}",), tuple(range(7)), {"afraid": "increasing"}, 4)
    rising = np.arange(7.0)[None, :, None].repeat(2, 2)  # both sweeps rise with the number
    r = family_result(fam, rising, ["afraid", "calm"], 0.6, rising.copy())
    assert r["pass_without_control"] and not r["pass"] and r["checks"]["afraid"]["ratio"] == 1


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 8), st.randoms(use_true_random=False))
def test_pair_accuracy_and_sign_test_known_answers(right, wrong, ties, rnd):
    diff = [1.0 + rnd.random()] * right + [-(0.1 + rnd.random())] * wrong + [0.0] * ties
    rnd.shuffle(diff)
    if not diff:
        return
    r = stats.pair_stats(np.array(diff))
    n = right + wrong
    p = sum(math.comb(n, i) for i in range(right, n + 1)) / 2 ** n if n else 1.0
    assert r["right"] == right and r["pairs"] == len(diff)
    assert r["accuracy"] == pytest.approx(right / len(diff), abs=1e-4)
    assert r["sign_test_p"] == pytest.approx(p, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=2, max_size=6))
def test_group_bootstrap_resamples_whole_groups(sizes):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    seen = []
    lo, hi = stats.group_bootstrap(lambda idx: seen.append(np.bincount(groups[idx], minlength=len(sizes))) or 1.0,
                                   groups, n_boot=50)
    assert lo == hi == 1.0
    for counts in seen:  # every resample holds whole groups, as many as there are groups
        assert np.all(counts % np.array(sizes) == 0) and (counts // np.array(sizes)).sum() == len(sizes)


def test_position_rule_keeps_the_reply_token_unless_clearly_beaten():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 20)
    y = np.tile(np.arange(20) >= 10, 12).astype(float)
    noise = rng.normal(size=len(y))
    clear = positions.choose({"reply": noise, "user_mean": y + 0.3 * rng.normal(size=len(y))}, y, groups)
    assert clear["chosen"] == "user_mean" and clear["auroc"]["user_mean"] > 0.9
    close = positions.choose({"reply": y + noise, "user": y + noise + 0.05 * rng.normal(size=len(y))}, y, groups)
    assert close["chosen"] == "reply"


# -- the risk's usable gate ---------------------------------------------------------------
def synthetic(effect: float, n_groups: int = 16, seed: int = 0, pair_effect: float | None = None):
    """Groups of 14 rows, half dangerous; afraid rises with danger by ``effect`` sd (by
    ``pair_effect`` in the last four groups, the pair domains)."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(14) >= 7, n_groups).astype(float)
    names = [f"fam{i}" for i in range(n_groups - 4)] + [f"pairs:domain{i}" for i in range(4)]
    g = np.repeat(names, 14)
    sizes = np.where(np.char.startswith(g, "pairs:"), effect if pair_effect is None else pair_effect, effect)
    Z = rng.normal(size=(len(y), 3)) + (y * sizes)[:, None] * np.array([1.0, -1.0, 0])
    return {"Z": Z, "y": y, "groups": g, "report": np.repeat(np.arange(n_groups) % 2 == 1, 14)}


@pytest.mark.parametrize("effect,pair_effect,usable,words", [(3.0, 3.0, True, "clears"), (0.0, 0.0, False, "must clear"),
                                                             (3.0, 0.0, False, "fixed-number pairs alone")])
def test_usable_gate_follows_the_lower_ci_bound_and_the_pairs(effect, pair_effect, usable, words):
    r = risk_calibration(synthetic(effect, pair_effect=pair_effect), ["afraid", "calm", "happy"])["doc"]
    lo, hi = r["heldout"]["auroc_ci95"]
    assert r["usable"] is usable and words in r["usable_reason"] and "\n" not in r["usable_reason"]
    pairs = r["heldout"]["auroc_pairs_only"]
    assert r["usable"] == (lo >= 0.6 and pairs >= 0.6) and lo <= r["heldout"]["auroc"] <= hi
    assert r["side"] == "report" and r["heldout"]["groups"] == 8


def test_usable_gate_refuses_a_ci_over_too_few_groups():
    d = synthetic(3.0, n_groups=8)
    r = risk_calibration(d, ["afraid", "calm", "happy"])["doc"]
    assert r["heldout"]["auroc"] > 0.9 and not r["usable"] and "too few groups" in r["usable_reason"]


# -- the position sweep on a tiny model ---------------------------------------------------
def test_sweep_reads_every_position_and_layer_in_one_pass(tiny_llama, bank_for):
    from probes.capture import token_states
    from probes.tokens import encode_chat

    model, tok = tiny_llama
    bank = bank_for(model, tok)
    texts = ["i took 8 mg of tylenol", "my dog is home", "the tests fail again !"]
    sw = positions.sweep(model, tok, bank, texts, batch_size=2, chunk=2)
    names = sw["positions"]
    assert names[:2] == ["user_mean", "user"] and names[-1] == "reply" and "reply-1" in names
    reader = raw_reader(model, tok, bank)
    for k, p in enumerate(names):  # the bank's readout = what read_chat gives at that position
        np.testing.assert_allclose(sw["bank"][:, k], reader.read_chat(texts, at=p), atol=1e-4)
    layer = 1
    ids = [encode_chat(tok, [{"role": "user", "content": t}], generation_prompt=True)[1] for t in texts]
    h = token_states(model, ids, layer)
    v = bank.tensors["layer_vectors"][layer, [bank.index("afraid"), bank.index("calm")]]
    np.testing.assert_allclose(sw["layers"][:, -1, layer], np.stack([x[-1].numpy() @ v.T for x in h]), atol=1e-4)
    gap = len(sw["tokens"]) - 1
    with pytest.raises(ValueError, match="inside the user's turn"):
        reader.read_chat(texts, at=f"reply-{gap + 1}")
    assert isinstance(TorchReader(model, tok, bank).read_chat(texts[:1], at=f"reply-{gap}"), np.ndarray)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-4, 4), st.booleans()), min_size=2, max_size=40))
def test_auroc_matches_sklearn_with_ties(rows):
    from sklearn.metrics import roc_auc_score

    p, y = np.array([r[0] for r in rows], float), np.array([r[1] for r in rows], float)
    expected = roc_auc_score(y, p) if 0 < y.mean() < 1 else float("nan")
    assert stats.auroc(p, y) == pytest.approx(expected, nan_ok=True)

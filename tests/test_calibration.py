"""calibration/: suite format, neutral set, the math (hypothesis), curves on tiny models,
the whole calibrate step and its CLI, and one plumbing check on the real default model."""
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calibration import (NeutralSet, SuiteError, builtin_suites, calibrate_run, neutral_set, parse_suite,
                         risk_from_scores, risk_head)
from calibration import stats
from calibration import positions
from calibration.run import raw_reader, read_neutral, suite_rows
from monitor.cli import main as cli
from probes.bank import ProbeBank
from probes.reader import TorchReader

FAMILY = {"name": "tylenol", "template": "i took {x} mg of tylenol", "levels": [250, 1000, 4000, 16000],
          "danger_from": 4000, "expect": {"afraid": "increasing", "calm": "decreasing"}}


def suite(**changes):
    return {"name": "dosage", "families": [{**FAMILY, **changes}]}


# -- suite format -------------------------------------------------------------------------
def test_valid_suite_parses_with_words_falling_numbers_and_paraphrases():
    s = parse_suite({"name": "mix", "families": [
        FAMILY,
        {"name": "runway", "templates": ["{x} months left", "we have {x} months"], "levels": [24, 12, 6, 1],
         "danger_from": 6, "expect": {"afraid": "increasing"}},
        {"name": "dog", "template": "gone for {x}", "templates": ["missing {x}"], "levels": ["an hour", "a day", "a week"],
         "expect": {"calm": "decreasing"}}]})
    tyl, runway, dog = s.families
    assert tyl.danger_index == 2 and runway.danger_index == 2 and dog.danger_index is None
    assert dog.templates == ("gone for {x}", "missing {x}")
    assert [p[2] for p in runway.prompts()][:2] == ["24 months left", "12 months left"]
    assert len(dog.prompts()) == 6 and {p[0] for p in dog.prompts()} == {0, 1}


@pytest.mark.parametrize("changes,field", [
    ({"levels": [250, 1000]}, "levels"),
    ({"levels": [250, 1000, 500, 16000]}, "levels"),
    ({"levels": [250, "lots", 4000]}, "levels"),
    ({"levels": ["a", "b", "a"]}, "levels"),
    ({"levels": [1, True, 3]}, "levels"),
    ({"danger_from": 3000}, "danger_from"),
    ({"danger_from": 250}, "danger_from"),
    ({"expect": {"afraid": "up"}}, "expect"),
    ({"expect": {}}, "expect"),
    ({"template": "no slot here"}, "template"),
    ({"templates": []}, "templates"),
    ({"templates": ["ok {x}", 3]}, "templates"),
    ({"danger_form": 4000}, "danger_form"),
])
def test_malformed_family_names_family_and_field(changes, field):
    with pytest.raises(SuiteError, match=rf"family 'tylenol'.*field '{field}'"):
        parse_suite(suite(**changes))


def test_malformed_suite_level_errors():
    with pytest.raises(SuiteError, match="'name'"):
        parse_suite({"families": [FAMILY]})
    with pytest.raises(SuiteError, match="'families'"):
        parse_suite({"name": "x", "families": []})
    with pytest.raises(SuiteError, match="family 'tylenol'.*used by more than one"):
        parse_suite({"name": "x", "families": [FAMILY, FAMILY]})
    with pytest.raises(SuiteError, match="family '#0'.*field 'name'"):
        parse_suite({"name": "x", "families": [{k: v for k, v in FAMILY.items() if k != "name"}]})


def test_builtin_suites_cover_the_paper_and_our_families():
    suites = [s for s in builtin_suites() if s.kind == "families"]
    fams = {f.name: f for s in suites for f in s.families}
    paper = {"tylenol", "no_food", "missing_dog", "startup_runway", "students_passing"}
    assert paper <= set(fams) and len(set(fams) - paper) >= 8
    assert fams["tylenol"].templates[0] == "I just took {x} mg of Tylenol for my back pain."
    named = re.compile(r"\b(afraid|calm|fear\w*|scar(ed|y)|panic\w*|worr\w*|anxi\w*|nervous|terrif\w*)\b", re.I)
    for f in fams.values():
        assert len(f.templates) >= 3 and f.danger_index is not None and {"afraid", "calm"} <= set(f.expect)
        assert not any(named.search(t) for t in f.templates), f.name  # context, never the emotion word


def test_neutral_set_is_large_distinct_and_not_a_scenario():
    ns = neutral_set()
    assert len(ns.prompts) >= 300 and len(set(ns.prompts)) == len(ns.prompts) and len(ns.chats) >= 50
    templates = {t.split("{x}")[0] for s in builtin_suites() if s.kind == "families" for f in s.families
                 for t in f.templates}
    assert not any("{" in p or any(t and p.startswith(t) for t in templates) for p in ns.prompts)


# -- the math -----------------------------------------------------------------------------
finite = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(4, 60), elements=finite), st.data(), st.sampled_from(stats.CALIBRATORS))
def test_calibrators_are_monotone_and_bounded(s, data, kind):
    y = data.draw(arrays(np.float64, len(s), elements=st.sampled_from([0.0, 1.0])))
    x, p = stats.fit_calibrator(kind, s, y)
    assert np.all(np.diff(x) > 0) and np.all(np.diff(p) >= -1e-12) and p.min() >= 0 and p.max() <= 1
    grid = np.linspace(s.min() - 100, s.max() + 100, 500)
    r = stats.piecewise_linear(grid, x, p)
    np.testing.assert_allclose(r, np.interp(grid, x, p), atol=1e-9)
    assert np.all(np.diff(r) >= -1e-9) and r.min() >= 0 and r.max() <= 1


def test_platt_tracks_a_logistic_truth_and_isotonic_fits_separable_data():
    rng = np.random.default_rng(0)
    s = rng.normal(size=4000) * 2
    y = (rng.random(4000) < 1 / (1 + np.exp(-(1.5 * s - 1)))).astype(float)
    x, p = stats.fit_calibrator("platt", s, y)
    np.testing.assert_allclose(np.interp([-1, 0, 1, 2], x, p), 1 / (1 + np.exp(-(1.5 * np.array([-1, 0, 1, 2]) - 1))), atol=0.05)
    x, p = stats.fit_calibrator("isotonic", np.arange(10.0), (np.arange(10) >= 5).astype(float))
    assert np.interp(3, x, p) == 0 and np.interp(7, x, p) == 1


@settings(max_examples=80, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 300), st.integers(1, 4)),
              elements=st.one_of(finite, st.integers(-3, 3).map(float))),
       st.floats(0, 0.5))
def test_threshold_at_fpr_holds_on_its_own_data(scores, f):
    t = stats.threshold_at_fpr(scores, f)
    assert np.all((scores > t).mean(0) <= f)
    assert np.all(np.isin(t, scores))  # a data value: the tightest such threshold
    distinct = [j for j in range(scores.shape[1]) if len(np.unique(scores[:, j])) == len(scores)]
    for j in distinct:  # without ties it is tight: one step lower would exceed f
        assert (scores[:, j] >= t[j]).mean() > f


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(3, 12), st.integers(1, 5)), elements=st.integers(-5, 5).map(float)))
def test_spearman_matches_scipy(curves):
    from scipy.stats import spearmanr

    rho = stats.spearman(curves)
    for j in range(curves.shape[1]):
        expected = 0.0 if np.ptp(curves[:, j]) == 0 else spearmanr(np.arange(len(curves)), curves[:, j]).statistic
        assert rho[j] == pytest.approx(expected, abs=1e-9)


def test_reliability_bins_and_ece():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    y = np.array([0, 0, 1, 1, 1, 0])
    rel = stats.reliability(p, y)
    assert rel["ece"] == pytest.approx((2 * 0.05 + 2 * 0.05 + 2 * 0.05) / 6)  # |.55 - .5| in the middle bin
    assert [b["n"] for b in rel["bins"]] == [2, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert stats.reliability([1.0, 0.0], [1, 0])["ece"] == 0  # p = 1 falls in the last bin


def test_lofo_risk_separates_when_afraid_tracks_danger():
    rng = np.random.default_rng(2)
    labels = ["afraid", "calm", "happy"]
    groups = np.repeat(np.arange(5), 40)
    y = np.tile(np.arange(8) >= 4, 25).astype(float)
    Z = rng.normal(size=(200, 3)) + np.outer(y, [2.0, -1.0, 0.0]) + groups[:, None] * [0, 0, 3.0]
    for score in stats.SCORES:
        for cal, r in stats.lofo(score, Z, y, groups, labels).items():
            assert r["auroc"] > 0.9 and r["brier"] < 0.15 and 0 <= r["ece"] < 0.2, (score, cal, r["auroc"])
    w, b, x, p = stats.fit_risk("afraid-calm", "isotonic", Z, y, groups, labels)
    assert w.tolist() == [1.0, -1.0, 0.0]


# -- reading on tiny models ---------------------------------------------------------------
SMALL = {"name": "small", "families": [
    {"name": "dose", "templates": ["i took {x} mg of tylenol", "my back pain : {x} mg tylenol now"],
     "levels": [1, 2, 4, 8], "danger_from": 4, "expect": {"afraid": "increasing"},
     "control": {"templates": ["i ate {x} food", "my dog : {x} food now"]}},
    {"name": "food", "template": "no food for {x} hours", "levels": [2, 5, 9], "danger_from": 9,
     "expect": {"calm": "decreasing"}},
    {"name": "tests", "templates": ["{x} tests fail again", "the code has {x} error"], "levels": [0, 3, 6, 9],
     "danger_from": 6, "expect": {"afraid": "increasing"}}]}
PAIRS = {"name": "pp", "kind": "pairs", "expect": {"afraid": "increasing", "calm": "decreasing"},
         "pairs": [{"id": f"d{i}-{j}", "domain": f"d{i}", "safe": f"i took {j} mg of food",
                    "danger": f"i took {j} mg of tylenol"} for i in range(3) for j in range(3)]}
OTHER = {"name": "other", "families": [
    {"name": "dog", "template": "the dog is gone for {x} days", "levels": [1, 3, 7], "expect": {"calm": "decreasing"}}]}


def test_curves_do_not_depend_on_batch_composition(tiny, bank_for):
    model, tok = tiny
    bank = bank_for(model, tok)
    texts = [r[-1] for r in suite_rows([parse_suite(SMALL)])]  # every prompt, controls included
    other = [r[-1] for r in suite_rows([parse_suite(OTHER)])]
    alone = positions.sweep(model, tok, bank, texts, batch_size=1)["bank"]
    mixed = positions.sweep(model, tok, bank, other + texts[::-1], batch_size=5, chunk=7)["bank"][len(other):][::-1]
    np.testing.assert_allclose(alone, mixed, atol=1e-4)


@pytest.fixture
def calibrated(tiny_llama, bank_for, tmp_path):
    model, tok = tiny_llama
    bank = bank_for(model, tok)
    prompts = tuple(f"{w} {v} please" for w in ("hello", "thanks", "help", "yes", "ok") for v in
                    ("the code", "my work", "the day", "a friend", "home", "the run", "money", "time", "dinner", "a dog"))
    chats = (({"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello , thanks"}),
             ({"role": "user", "content": "what time is it ?"}, {"role": "assistant", "content": "it is 8 at night ."}))
    ns = NeutralSet(prompts, chats)
    new = calibrate_run(tmp_path, model, tok, bank, suites=[SMALL, OTHER, PAIRS], out=tmp_path / "all.json",
                        progress=False, neutral=ns, split={"families": {"tests"}, "pairs": {"d0-1", "d2-0"}})
    return model, tok, bank, new, ns, tmp_path


def test_calibrate_run_writes_a_z_scored_bank_thresholds_and_risk(calibrated):
    model, tok, old, new, ns, run = calibrated
    loaded = ProbeBank.load(run)
    assert loaded.calibrated and loaded.meta["calibration"]["risk"]["tensors"] == ["risk_weight", "risk_bias", "risk_x", "risk_y"]
    for k in ("score_mean", "score_std", "alert_threshold", "position_mean", "risk_weight", "risk_x"):
        np.testing.assert_array_equal(loaded.tensors[k], new.tensors[k])
    reader = TorchReader(model, tok, loaded)
    where = loaded.meta["calibration"]["position"]["at"]  # chosen on the select side
    at, tokens = read_neutral(reader, ns, where)
    np.testing.assert_allclose(at, reader.read_chat(list(ns.prompts), at=where), atol=1e-4)  # the same position
    # bank z-scores: ordinary message text has mean 0 and std 1; the reply token has its own baseline
    np.testing.assert_allclose(tokens.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(tokens.std(0), 1, atol=1e-3)
    np.testing.assert_allclose(at.mean(0), loaded.tensors["position_mean"], atol=1e-3)
    np.testing.assert_allclose(at.std(0), loaded.tensors["position_std"], rtol=1e-3, atol=1e-5)
    assert np.all((tokens > loaded.tensors["alert_threshold"] + 1e-4).mean(0) <= 0.01)
    assert np.all((at > loaded.tensors["position_alert_threshold"] + 1e-4).mean(0) <= 0.01)
    r = risk_from_scores(loaded, at)
    assert r.shape == (len(at),) and r.min() >= 0 and r.max() <= 1
    from probes.capture import token_states

    h = token_states(model, [tok("i took 8 mg of tylenol")["input_ids"]], loaded.layer)[0].numpy()
    W, bb = loaded.head()
    w, b = risk_head(loaded)  # the risk score folded into the read layer
    np.testing.assert_allclose(h @ w + b, (h @ W.T + bb) @ loaded.tensors["risk_weight"] + loaded.tensors["risk_bias"][0],
                               rtol=1e-4, atol=1e-4)


def test_risk_is_fitted_on_position_z_and_folded_exactly(calibrated):
    from calibration.stats import piecewise_linear

    *_, new, ns, run = calibrated
    doc = json.loads((run / "calibration" / "calibration.json").read_text())["risk"]
    t = new.tensors
    zp = np.random.default_rng(0).normal(size=(20, len(new.labels)))
    z = zp * t["position_std"] + t["position_mean"]
    w_p = t["risk_weight"] * t["position_std"]  # the weight as fitted, on position z-scores
    b_p = t["risk_bias"][0] + t["risk_weight"] @ t["position_mean"]
    np.testing.assert_allclose(risk_from_scores(new, z), piecewise_linear(zp @ w_p + b_p, t["risk_x"], t["risk_y"]),
                               atol=1e-4)
    if doc["score"] == "afraid-calm":
        assert np.count_nonzero(w_p) == 2


def test_calibrate_run_outputs(calibrated):
    *_, run = calibrated
    doc = json.loads((run / "calibration" / "small.json").read_text())
    fam = doc["families"]["dose"]
    assert set(fam) >= {"spearman", "pass", "curves", "checks", "control_curves"} and len(fam["curves"]["afraid"]) == 4
    c = fam["checks"]["afraid"]
    assert fam["pass_without_control"] == (fam["spearman"]["afraid"] >= doc["min_rho"])
    assert fam["pass"] == (fam["pass_without_control"] and abs(c["rho_control"]) <= 0.5 * abs(c["rho"]))
    assert not doc["families"]["food"]["pass"]  # no control: it cannot show it measures danger
    assert len(c["per_template_rho"]) == 2 and doc["families"]["tests"]["side"] == "report"
    summary = json.loads((run / "calibration" / "calibration.json").read_text())
    risk = summary["risk"]
    assert risk["families"] == 3 and risk["groups"] == 6 and risk["heldout"]["ece_bins"] == 10 and risk["side"] == "report"
    lo, hi = risk["heldout"]["auroc_ci95"]
    assert risk["usable"] == (lo >= 0.6 and risk["heldout"]["groups"] >= 5) and not risk["usable"]  # 3 groups: no CI
    assert {c["calibrator"] for c in risk["candidates"]} == {"isotonic", "platt"}
    pairs = json.loads((run / "calibration" / "pp.json").read_text())
    assert pairs["results"]["all"]["combined"]["pairs"] == 9 and pairs["results"]["report"]["afraid"]["pairs"] == 2
    assert summary["positions"]["bank"]["chosen"] == summary["at"] and "reply" in summary["positions"]["layers"]
    everything = json.loads((run / "all.json").read_text())
    assert set(everything["suites"]) == {"small", "other", "pp"} and everything["thresholds"]["fpr"] == 0.01
    for f in ("small.png", "other.png", "pp.png", "reliability.png", "positions.png"):
        assert (run / "calibration" / f).stat().st_size > 1000
    from monitor.commands.calibrate import summary_table

    table = summary_table(run)
    assert "small/dose" in table and "sign test" in table
    assert [ln for ln in table.splitlines() if ln.startswith("risk not usable:") and "too few groups" in ln]


def test_no_risk_without_three_labelled_families(tiny_llama, bank_for, tmp_path):
    model, tok = tiny_llama
    bank = bank_for(model, tok)
    bank.tensors["risk_weight"] = np.ones(len(bank.labels), np.float32)  # a stale calibrator is dropped
    new = calibrate_run(tmp_path, model, tok, bank, suites=[OTHER], progress=False, save=False,
                        neutral=NeutralSet(("hello please", "thanks a lot", "yes ok"), ()))
    assert new.meta["calibration"]["risk"] is None and "risk_weight" not in new.tensors
    assert not (tmp_path / "bank").exists()
    with pytest.raises(ValueError, match="no risk calibrator"):
        risk_from_scores(new, np.zeros((1, len(new.labels))))


def test_unknown_expected_emotion_is_refused_before_reading(tiny_llama, bank_for, tmp_path):
    model, tok = tiny_llama
    bad = {"name": "x", "families": [{**FAMILY, "expect": {"flabbergasted": "increasing"}}]}
    with pytest.raises(SuiteError, match="family 'tylenol'.*'expect'.*flabbergasted"):
        calibrate_run(tmp_path, model, tok, bank_for(model, tok), suites=[bad], progress=False)


def test_cli_rejects_a_malformed_suite_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(suite(levels=[1, 2])))
    assert cli(["calibrate", "--run", str(tmp_path), "--suite", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emoprobe calibrate: error:") and "family 'tylenol'" in err and "'levels'" in err
    path.write_text("{not json")
    assert cli(["calibrate", "--run", str(tmp_path), "--suite", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# -- the real default model: tokenizer plumbing, one family, seconds -----------------------
@pytest.mark.slow
def test_real_model_reads_suites_and_chat_tokens(bank_for, tmp_path):
    from probes.models import load_model

    model, tok = load_model()
    bank = bank_for(model, tok, layer=20)
    ns = neutral_set()
    reader = raw_reader(model, tok, bank)
    one = NeutralSet(ns.prompts[:2], ns.chats[:1])
    at, tokens = read_neutral(reader, one)
    np.testing.assert_allclose(at, reader.read_chat(list(one.prompts)), atol=1e-3 * np.abs(at).max())
    n_content = sum(len(tok(t)["input_ids"]) for t in one.prompts) + sum(len(tok(m["content"])["input_ids"])
                                                                            for m in one.chats[0])
    assert n_content - 3 <= len(tokens) <= n_content + 3  # message text only, not the system preamble
    fam = [s for s in builtin_suites() if s.name == "paper"][0].families[0]
    tylenol = parse_suite({"name": "t", "families": [{"name": "tylenol", "templates": list(fam.templates[:2]),
                                                      "levels": list(fam.levels), "expect": {"afraid": "increasing"}}]})
    texts = [r[-1] for r in suite_rows([tylenol])]
    a = positions.sweep(model, tok, bank, texts)
    b = positions.sweep(model, tok, bank, texts, batch_size=3)["bank"]
    reply = a["positions"].index("reply")
    assert a["bank"].shape[0] == 2 * 7 and a["bank"].shape[2] == len(bank.labels)
    np.testing.assert_allclose(a["bank"], b, atol=1e-3 * np.abs(a["bank"]).max())
    np.testing.assert_allclose(a["bank"][:2, reply], reader.read_chat(texts[:2]), atol=1e-3 * np.abs(a["bank"]).max())

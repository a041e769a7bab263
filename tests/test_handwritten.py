"""Corpus v2's rules as code: the family filter, the assignment table, sources, gates."""
import gzip
import json

import pytest
from hypothesis import given, strategies as st

from probes import handwritten
from probes.corpus import emotions, topics


def test_filter_rejects_every_family_form_in_any_case_and_compound():
    fams = handwritten.families()
    assert list(fams) == emotions()
    for emotion, forms in fams.items():
        assert emotion in forms
        for form in forms:
            text = f"Then {form.upper()} came up, and {form}-coloured light."
            assert handwritten.banned_words(text), form
    for compound in ("an angry-red rash", "bitter-tasting tea", "Scary.", "\"Sorry,\" she said.", "It was a kind of blue"):
        assert handwritten.banned_words(compound), compound


@pytest.mark.parametrize("clean", ["The kettle clicked off and Mara poured two cups.",
                                   "He signed the form, scanned the card and left at noon.",
                                   "Calmer seas? No: the kindling, a scarecrow, unmadness."])  # words that merely start alike
def test_filter_passes_text_without_family_words(clean):
    assert handwritten.banned_words(clean) == (["Calmer"] if "Calmer" in clean else [])


def test_a_story_that_names_an_emotion_is_rejected_not_cut(tmp_path):
    row = {"kind": "story", "person": "third"}
    story = ("Lena stood at the counter. " * 3 + "She felt calm. " + "The bus came at noon and she got on it. " * 3)
    problems = handwritten.check_text(row, story)
    assert any("emotion words: calm" in p for p in problems)
    path = tmp_path / "afraid.txt"
    path.write_text(f"## afraid/00 | x\n{story}\n")
    with pytest.raises(ValueError, match="afraid/00: emotion words: calm"):  # refused whole; nothing is trimmed
        handwritten.compile_corpus(tmp_path / "out.jsonl.gz", [path])
    assert not (tmp_path / "out.jsonl.gz").exists()


def test_assignment_table_balances_topics_and_never_ties_one_to_an_emotion():
    rows = handwritten.make_assignments()
    assert rows == handwritten.load_assignments()  # the committed table is this function's output
    stories = [r for r in rows if r["kind"] == "story" and r["wave"] == "main"]
    per_emotion = {}
    for r in stories:
        per_emotion.setdefault(r["emotion"], set()).add(r["topic"])
    assert len(per_emotion) == 171 and all(len(t) == 30 for t in per_emotion.values())  # 30 distinct topics each
    per_topic = {}
    for r in stories:
        per_topic.setdefault(r["topic"], set()).add(r["emotion"])
    assert set(per_topic) == set(topics()) and min(len(e) for e in per_topic.values()) >= 40
    first = sum(r["person"] == "first" for r in stories) / len(stories)
    assert 0.35 < first < 0.45
    assert len({r["id"] for r in rows}) == len(rows)


@given(st.lists(st.text(alphabet="abc .!?\"", min_size=1, max_size=40), min_size=1, max_size=5))
def test_blocks_round_trip(texts):
    import tempfile
    from pathlib import Path

    body = "".join(f"## t/{i} | brief\n{t}\n\n" for i, t in enumerate(texts))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.txt"
        p.write_text(body)
        assert handwritten.parse_blocks(p) == {f"t/{i}": t.strip() for i, t in enumerate(texts)}


def test_duplicate_block_and_stray_text_are_errors(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("## a/00 | x\none\n## a/00 | x\ntwo\n")
    with pytest.raises(ValueError, match="duplicate block a/00"):
        handwritten.parse_blocks(p)
    p.write_text("stray\n## a/00 | x\none\n")
    with pytest.raises(ValueError, match="before the first"):
        handwritten.parse_blocks(p)


def test_gates_count_near_duplicates_and_repeated_phrases():
    base = "the old ferry rocked against the pier while gulls circled over the grey harbour at dawn"
    rows = [{"id": f"x/{i}", "kind": "story", "emotion": "calm", "topic": "t", "person": "third", "name": "A",
             "text": base + f" and number {i} waited"} for i in range(3)]
    rows.append({"id": "y/0", "kind": "story", "emotion": "sad", "topic": "u", "person": "first", "name": "B",
                 "text": "a completely different sentence about bread rising in a warm kitchen oven"})
    g = handwritten.gates(rows)
    assert g["near_duplicate_pairs"]["count"] == 3  # every pair of the three copies
    assert g["repeated_4gram_share"]["max"][0] == "calm" and g["repeated_4gram_share"]["max"][1] > 0.5
    assert g["family_filter_failures"] == [] and g["stories_per_emotion"] == {"min": 1, "max": 3, "emotions": 2}


def test_shipped_corpus_is_compiled_from_the_sources_and_passes_the_gates():
    rows = [json.loads(line) for line in gzip.open(handwritten.SHIPPED, "rt")]
    table = {r["id"]: r for r in handwritten.load_assignments()}
    written = {i: " ".join(t.split()) for p in handwritten.source_files() for i, t in handwritten.parse_blocks(p).items() if t}
    assert {r["id"]: r["text"] for r in rows} == written  # nothing added, dropped or edited in between
    for r in rows:
        assert r["kind"] == table[r["id"]]["kind"] and not handwritten.check_text(table[r["id"]], r["text"])

"""Corpus v2: stories, messages and neutral dialogues written by hand to the paper's
recipe, and the checks every text must pass.

The texts live as plain-text sources under ``probes/data/v2/`` (one block per text,
headed ``## <id> | <brief>``), so writers never escape JSON by hand. The assignment
table fixes each text's emotion, topic, person and character name before anything is
written, so topic is balanced across emotions and never confounded with one.
``compile_corpus`` joins sources and table into the gzipped JSONL the build reads.

Writers run ``python3 -m probes.handwritten check FILE`` (stdlib only on that path).
"""
from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

from .corpus import DATA, emotions, topics

V2 = Path(str(DATA)) / "v2"
ASSIGNMENTS = V2 / "assignments.tsv"
SHIPPED = Path(str(DATA)) / "corpus-v2.jsonl.gz"
HEADLINE = ["afraid", "angry", "sad", "joyful", "proud", "guilty", "grateful", "disgusted",
            "surprised", "lonely", "desperate", "calm"]
STORIES_PER_EMOTION = 30
MESSAGES_PER_EMOTION = 10
NEUTRAL_PER_TOPIC = 4
STORY_WORDS = (70, 140)
STORY_SENTENCES = (4, 7)
NAMES = """Maya Tom Lena Samir Priya Jonas Ana Kenji Zoe Omar Ruth Leo Fatima Diego Ingrid Kwame
Mei Pavel Aisha Connor Lucia Ravi Hannah Tariq Sofia Mateo Nadia Ethan Yuki Bruno Chloe Emeka Ines
Graham Amara Felix Rosa Dmitri Leila Owen Carmen Hiro Beatrice Idris Marta Jamal Elsa Nikhil Grace
Tobias Alma Kofi Greta Rafael Noor Isaac Wanda Arjun Clara Malik Petra Santiago Mirela Dev Olivia
Yusuf Freya Luis Anneke Jin Harriet Ade Selma Marco Tamsin Hamid Vera Julian Esi Gustavo Lotte Sanjay
Imogen Chidi Astrid Pablo Farah Walter Min-jun Rhea Stefan Zainab Caleb Irene Kaito Delia Femi Ursula
Andrei Layla Quentin Mariam Hugo Sunita Viktor Eleni Marcus Ayesha Bram Lorna Tenzin Gloria Nils Halima
Ricardo Edith Sione Daria Kemal Opal Theo Bianca Rashid Wren Emil Nkechi Joaquin Paula Ilya Sadia Cormac
Lin Dorothy Anil Katya Jerome Mina Sven Thandiwe Otto Roya Declan Elif Marisol Gideon Asha Henrik Kalani""".split()


def slug(emotion: str) -> str:
    """File name of an emotion's sources: spaces become hyphens (at ease -> at-ease)."""
    return emotion.replace(" ", "-")


def make_assignments() -> list[dict]:
    """The committed table, deterministic: each emotion's 30 stories fall on 30 distinct
    topics spread over all of them (every topic carries ~43 emotions); 40% first person."""
    emo, top = emotions(), topics()
    rows = []
    for i, e in enumerate(emo):
        for j in range(STORIES_PER_EMOTION):
            rows.append({"id": f"{slug(e)}/{j:02d}", "kind": "story", "emotion": e,
                         "topic": top[(4 * j + i) % len(top)],
                         "person": "first" if (i + j) % 5 in (0, 2) else "third",
                         "name": NAMES[(31 * i + 7 * j) % len(NAMES)], "wave": "main"})
    pilot_topics = top[::10][:12]
    for i, e in enumerate(HEADLINE):
        for k, t in enumerate(pilot_topics):
            rows.append({"id": f"{slug(e)}/p{k:02d}", "kind": "story", "emotion": e, "topic": t,
                         "person": "first" if (i + k) % 5 in (0, 2) else "third",
                         "name": NAMES[(13 * i + 11 * k + 5) % len(NAMES)], "wave": "pilot"})
    for i, e in enumerate(emo):
        for k in range(MESSAGES_PER_EMOTION):
            rows.append({"id": f"{slug(e)}/m{k:02d}", "kind": "message", "emotion": e,
                         "topic": top[(12 * k + 3 * i + 1) % len(top)],
                         "person": "user" if k % 2 == 0 else "agent", "name": "", "wave": "main"})
    for n in range(NEUTRAL_PER_TOPIC * len(top)):
        rows.append({"id": f"neutral/{n:03d}", "kind": "neutral", "emotion": "", "topic": top[n % len(top)],
                     "person": "dialogue", "name": f"{NAMES[(3 * n) % len(NAMES)]} and {NAMES[(3 * n + 50) % len(NAMES)]}",
                     "wave": "main"})
    return rows


FIELDS = ["id", "kind", "emotion", "topic", "person", "name", "wave"]


def load_assignments(path: Path = ASSIGNMENTS) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_assignments(path: Path = ASSIGNMENTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, FIELDS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(make_assignments())


# --- the family filter ------------------------------------------------------------

@lru_cache(maxsize=1)
def families() -> dict[str, list[str]]:
    """Emotion -> every form no text may contain (probes/data/emotion_families.json)."""
    return json.loads(DATA.joinpath("emotion_families.json").read_text())["families"]


@lru_cache(maxsize=1)
def _banned_pattern() -> re.Pattern:
    forms = sorted({f.lower() for fam in families().values() for f in fam}, key=len, reverse=True)
    alts = [r"[\s-]+".join(re.escape(p) for p in re.split(r"[\s-]+", f)) for f in forms]
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)  # inside compounds too: angry-red


def banned_words(text: str) -> list[str]:
    """The emotion-family forms a text contains (empty when it is clean)."""
    return [m.group(0) for m in _banned_pattern().finditer(text)]


# --- sources -----------------------------------------------------------------------

_HEADER = re.compile(r"^## +([^|\s]+)\s*(?:\|.*)?$")


def parse_blocks(path: Path) -> dict[str, str]:
    """id -> text of every ``## id | brief`` block in a source file (text may be empty)."""
    blocks: dict[str, list[str]] = {}
    current = None
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            if current in blocks:
                raise ValueError(f"{path}:{n}: duplicate block {current}")
            blocks[current] = []
        elif current is not None:
            blocks[current].append(line)
        elif line.strip():
            raise ValueError(f"{path}:{n}: text before the first '## id' header")
    return {k: "\n".join(v).strip() for k, v in blocks.items()}


_SENT = re.compile(r"[^.!?]+(?:[.!?]+[\"”’')]*|$)")


def sentences(text: str) -> int:
    """Sentences in prose; a quotation ending in ?/! mid-sentence counts as one break."""
    return sum(1 for s in _SENT.findall(text.replace("\n", " ")) if re.search(r"\w", s))


def check_text(row: dict, text: str) -> list[str]:
    """Problems with one text against its assignment (empty list: it passes)."""
    problems = []
    if not text:
        return ["empty"]
    bad = banned_words(text)
    if bad:
        problems.append("emotion words: " + ", ".join(sorted(set(w.lower() for w in bad))))
    words = len(text.split())
    if row["kind"] == "story":
        lo, hi = STORY_WORDS
        if not lo <= words <= hi:
            problems.append(f"{words} words (want {lo}-{hi})")
        s = sentences(text)
        if not STORY_SENTENCES[0] <= s <= STORY_SENTENCES[1]:
            problems.append(f"{s} sentences (want {STORY_SENTENCES[0]}-{STORY_SENTENCES[1]})")
        if row["person"] == "third" and re.search(r"\b(I|I'm|I'd|I've|my|me)\b", text.split('"')[0]):
            problems.append("third-person story opens in first person")
    elif row["kind"] == "implicit":
        if not 1 <= sentences(text) <= 4 or words > 80:
            problems.append(f"user turn of {sentences(text)} sentences / {words} words (want 1-4, <= 80 words)")
    elif row["kind"] == "message":
        if not 1 <= sentences(text) <= 3 or words > 70:
            problems.append(f"message of {sentences(text)} sentences / {words} words (want 1-3, <= 70 words)")
    elif row["kind"] == "neutral" and words < 40:
        problems.append(f"{words} words (want >= 40)")
    return problems


def brief(row: dict) -> str:
    """The header a writer sees above an empty block."""
    who = {"first": "first person", "third": f"third person, main character {row['name']}",
           "user": "written by a user to an assistant", "agent": "written by an AI agent in its own log or reply",
           "dialogue": f"dialogue between {row['name']}"}[row["person"]]
    what = f"{row['emotion']} | " if row["emotion"] else ""
    if row["person"] == "first":
        who += f" (narrator may be called {row['name']})"
    return f"## {row['id']} | {what}{row['topic']} | {who}"


def source_path(row: dict) -> Path:
    """Where a text's block lives: one file per emotion and kind; neutral in 4 parts."""
    if row["kind"] == "neutral":
        return V2 / "neutral" / f"part{int(row['id'].split('/')[1]) % 4}.txt"
    folder = {"story": "pilot" if row["wave"] == "pilot" else "stories", "message": "messages"}[row["kind"]]
    return V2 / folder / f"{slug(row['emotion'])}.txt"


def write_skeletons() -> None:
    """Empty blocks with their briefs for every assignment whose file does not exist yet."""
    by_file: dict[Path, list[dict]] = {}
    for row in load_assignments():
        by_file.setdefault(source_path(row), []).append(row)
    for path, rows in by_file.items():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(brief(r) + "\n\n" for r in rows), encoding="utf-8")


def source_files() -> list[Path]:
    return sorted(p for p in V2.rglob("*.txt"))


EVAL = Path(str(DATA)) / "eval"


def eval_rows(with_empty: bool = False) -> list[dict]:
    """The held-out evaluation sets' blocks (ids ``implicit/<emotion>/<k>`` for user turns
    that imply an emotion, ``heldout/<emotion>/<k>`` for first-person messages)."""
    by_slug = {slug(e): e for e in emotions()}
    rows = []
    for path in sorted(EVAL.glob("*.txt")):
        for tid, text in parse_blocks(path).items():
            if not text and not with_empty:
                continue
            kind, s, _k = tid.split("/")
            rows.append({"id": tid, "kind": {"implicit": "implicit", "heldout": "message"}[kind],
                         "emotion": by_slug[s], "person": "user", "text": " ".join(text.split())})
    return rows


def check_files(paths: list[Path]) -> int:
    """Print every problem in the given source files; returns how many texts fail."""
    table = {r["id"]: r for r in load_assignments()}
    table.update({r["id"]: r for r in eval_rows(with_empty=True)})
    failing = 0
    for path in paths:
        for tid, text in parse_blocks(path).items():
            if tid not in table:
                print(f"{path}: {tid}: not in the assignment table")
                failing += 1
                continue
            problems = check_text(table[tid], text)
            if problems:
                failing += 1
                print(f"{path}: {tid}: " + "; ".join(problems))
    return failing


def compile_corpus(out: Path, sources: list[Path] | None = None) -> dict:
    """Join every written, passing text with its assignment into gzipped JSONL.
    A failing text is an error, never silently dropped."""
    table = {r["id"]: r for r in load_assignments()}
    rows = []
    for path in sources or source_files():
        for tid, text in parse_blocks(path).items():
            if not text:
                continue
            row = table.get(tid)
            if row is None:
                raise ValueError(f"{path}: {tid} is not in the assignment table")
            problems = check_text(row, text)
            if problems:
                raise ValueError(f"{path}: {tid}: " + "; ".join(problems))
            rows.append({"id": tid, "kind": row["kind"], "topic": row["topic"], "emotion": row["emotion"] or None,
                         "person": row["person"], "name": row["name"], "wave": row["wave"], "text": " ".join(text.split())})
    order = {r["id"]: n for n, r in enumerate(table.values())}
    rows.sort(key=lambda r: order[r["id"]])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime 0: same sources, same bytes
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    return counts


# --- quality gates ---------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def gates(rows: list[dict]) -> dict:
    """Corpus figures that catch a lazy or mechanical writer, for the corpus card:
    near-duplicates (texts sharing a 6-gram that no other pair shares less often than
    chance would: reported as pairs sharing >= 2 six-grams), each emotion's share of
    repeated 4-grams (4-grams used in more than one of its stories), distinct openings
    and names, lengths, and coverage per emotion and topic."""
    import numpy as np

    stories = [r for r in rows if r["kind"] == "story"]
    owners: dict[tuple[str, ...], list[int]] = {}
    grams = [_ngrams(_words(r["text"]), 6) for r in rows]
    for i, g in enumerate(grams):
        for gram in g:
            owners.setdefault(gram, []).append(i)
    shared: dict[tuple[int, int], int] = {}
    for idx in owners.values():
        if 1 < len(idx) <= 20:  # a 6-gram in dozens of texts is a stock phrase, counted below
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    shared[idx[a], idx[b]] = shared.get((idx[a], idx[b]), 0) + 1
    near = sorted(((rows[a]["id"], rows[b]["id"], k) for (a, b), k in shared.items() if k >= 2),
                  key=lambda t: -t[2])
    common6 = sorted(((" ".join(g), len(i)) for g, i in owners.items() if len(i) > 20), key=lambda t: -t[1])
    by_emotion: dict[str, list[dict]] = {}
    for r in stories:
        by_emotion.setdefault(r["emotion"], []).append(r)
    repeated = {}
    for e, rs in by_emotion.items():
        counts: dict[tuple[str, ...], int] = {}
        for r in rs:
            for g in _ngrams(_words(r["text"]), 4):
                counts[g] = counts.get(g, 0) + 1
        repeated[e] = round(sum(1 for c in counts.values() if c > 1) / max(len(counts), 1), 4)
    openings = [" ".join(_words(r["text"])[:2]) for r in stories]
    first = [(_words(r["text"]) or [""])[0] for r in stories]
    lengths = np.array([len(r["text"].split()) for r in stories]) if stories else np.zeros(1)
    per_emotion = {e: len(rs) for e, rs in by_emotion.items()}
    topics_per_emotion = {e: len({r["topic"] for r in rs}) for e, rs in by_emotion.items()}
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    banned = [r["id"] for r in rows if banned_words(r["text"])]
    return {
        "texts": kinds, "family_filter_failures": banned,
        "stories_per_emotion": {"min": min(per_emotion.values(), default=0), "max": max(per_emotion.values(), default=0),
                                "emotions": len(per_emotion)},
        "topics": len({r["topic"] for r in stories}),
        "topics_per_emotion": {"min": min(topics_per_emotion.values(), default=0)},
        "first_person_share": round(float(np.mean([r.get("person") == "first" for r in stories])), 3) if stories else 0,
        "words": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
        "near_duplicate_pairs": {"count": len(near), "worst": near[:10]},
        "stock_6grams": common6[:10],
        "repeated_4gram_share": {"median": float(np.median(list(repeated.values()))) if repeated else 0,
                                 "max": max(repeated.items(), key=lambda t: t[1]) if repeated else None},
        "openings": {"distinct_first_two_words": round(len(set(openings)) / max(len(openings), 1), 3),
                     "top_first_words": sorted(((w, first.count(w)) for w in set(first)), key=lambda t: -t[1])[:8]},
        "names": {"distinct": len({r.get("name") for r in rows if r.get("name")})},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("check", "assign", "compile"):
        print("usage: python -m probes.handwritten check [FILE ...] | assign | compile", file=sys.stderr)
        return 2
    if argv[0] == "compile":  # sources -> the shipped corpus, and the gates' figures beside it
        counts = compile_corpus(SHIPPED)
        from .corpus import read_jsonl

        rows = list(read_jsonl(SHIPPED))
        figures = {"counts": counts, **gates(rows)}
        SHIPPED.with_name("corpus-v2.gates.json").write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures, indent=1))
        return 0
    if argv[0] == "assign":  # the table, then empty blocks for writers to fill
        write_assignments()
        write_skeletons()
        return 0
    paths = [Path(p) for p in argv[1:]] or source_files()
    failing = check_files(paths)
    print(f"{failing} failing text(s)" if failing else "all texts pass")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())

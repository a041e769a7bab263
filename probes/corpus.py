"""The story corpus: a model writes stories in which a character feels an emotion
without naming it, and neutral dialogues on the same topics (the paper's method).

Generation appends to a JSONL file and skips what is already there, so a killed run
resumes where it stopped. Stories that name their emotion are repaired by dropping the
sentences that name it (the leak filter); stories left too short are discarded.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

DATA = resources.files("probes") / "data"


def emotions() -> list[str]:
    """The paper's 171 emotion words, in its order."""
    return [w.strip() for w in DATA.joinpath("emotions171.txt").read_text().splitlines() if w.strip()]


def topics() -> list[str]:
    """Our everyday topics (written for this project)."""
    return [t.strip() for t in DATA.joinpath("topics.txt").read_text().splitlines() if t.strip()]


STORY_PROMPT = (
    "Write a short story of five or six sentences about {topic}. The main character, {name}, "
    "feels {emotion}. Never write the word \"{emotion}\" or any word that names the feeling. "
    "Show it only through what {name} does, says, notices and feels in the body."
)
NEUTRAL_PROMPT = (
    "Write a short conversation between two people about {topic}. They only exchange "
    "practical facts such as times, places, prices and steps, in a plain and neutral tone."
)
NAMES = ["Maya", "Tom", "Lena", "Sam", "Priya", "Jonas", "Ana", "Ken", "Zoe", "Omar", "Ruth", "Leo"]


@dataclass(frozen=True)
class Job:
    """One text to write: a story (emotion set) or a neutral dialogue (emotion None)."""

    id: str
    kind: str  # "story" | "neutral"
    topic: str
    emotion: str | None
    prompt: str


def plan(n_stories: int = 30, n_neutral: int = 3, emotion_list=None, topic_list=None) -> list[Job]:
    """Deterministic jobs: each emotion gets n_stories distinct topics, spread over the list."""
    emo = emotion_list or emotions()
    top = topic_list or topics()
    jobs = []
    for t_i, topic in enumerate(top):
        for j in range(n_neutral):
            jobs.append(Job(f"n:{t_i}:{j}", "neutral", topic, None, NEUTRAL_PROMPT.format(topic=topic)))
    # Round by round, so an interrupted run still covers every emotion evenly.
    for j in range(n_stories):
        for e_i, emotion in enumerate(emo):
            t_i = (e_i * 7 + j * (len(top) // n_stories or 1)) % len(top)
            name = NAMES[(e_i + j) % len(NAMES)]
            prompt = STORY_PROMPT.format(topic=top[t_i], emotion=emotion, name=name)
            jobs.append(Job(f"s:{emotion}:{j}", "story", top[t_i], emotion, prompt))
    return jobs


def _stem_pattern(emotion: str) -> re.Pattern:
    """Match the emotion word and its word family (desperate, desperately, desperation)."""
    parts = []
    for word in emotion.lower().split():
        stem = word[: max(4, len(word) - 2)] if len(word) > 5 else word
        parts.append(re.escape(stem) + r"\w*")
    return re.compile(r"\b" + r"\s+".join(parts), re.IGNORECASE)


_SENTENCE = re.compile(r"(?<=[.!?])[\"”']?\s+")


def clean_story(text: str, emotion: str, min_sentences: int = 3) -> tuple[str | None, bool]:
    """Return (story without the sentences that name the emotion, whether it leaked).

    None when too little is left to carry the emotion.
    """
    text = re.sub(r"^\s*(title:.*\n|#.*\n|\*\*.*\*\*\s*\n)", "", text.strip(), flags=re.IGNORECASE)
    pattern = _stem_pattern(emotion)
    leaked = bool(pattern.search(text))
    sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    kept = [s for s in sentences if not pattern.search(s)]
    if kept and not re.search(r"[.!?\"”']$", kept[-1]):  # cut off mid-sentence by the token limit
        kept = kept[:-1]
    if len(kept) < min_sentences:
        return None, leaked
    return " ".join(kept), leaked


def read_jsonl(path: Path) -> Iterator[dict]:
    """Records of a (possibly gzipped) JSONL file of ``{"id": ..., "text": ...}`` lines.
    A missing file or any malformed line, the last included, is an error naming it:
    user input is never dropped silently (generation's own resumable file has
    ``read_jsonl_raw``, which forgives a torn last line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: malformed JSON line") from None
            if not isinstance(rec, dict) or "id" not in rec or "text" not in rec:
                raise ValueError(f"{path}:{n}: a line needs 'id' and 'text'")
            yield rec


def generate(model, tokenizer, jobs: list[Job], out: Path, *, batch_size: int = 32,
             max_new_tokens: int = 120, temperature: float = 0.8, seed: int = 0, writer: str = "") -> dict:
    """Write every job not yet in ``out`` (append-only JSONL). Returns counts."""
    import torch
    from tqdm import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_jsonl_raw(out)} if out.exists() else set()
    todo = [j for j in jobs if j.id not in done]
    # Terminate a torn last line from a kill so the next append starts cleanly.
    if out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with open(out, "a") as f:
            f.write("\n")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation pads left; restored below
    counts = {"written": 0, "skipped_done": len(jobs) - len(todo)}
    try:
        bar = tqdm(total=len(todo), desc="writing corpus", unit="text")
        with open(out, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts = [tokenizer.apply_chat_template([{"role": "user", "content": j.prompt}],
                                                         add_generation_prompt=True, tokenize=False)
                           for j in batch]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                torch.manual_seed(seed + start)
                with torch.inference_mode():
                    gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         repetition_penalty=1.1)
                texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for job, text in zip(batch, texts):
                    rec = {"id": job.id, "kind": job.kind, "topic": job.topic, "emotion": job.emotion,
                           "raw": text.strip(), "writer": writer}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                counts["written"] += len(batch)
                bar.update(len(batch))
        bar.close()
    finally:
        tokenizer.padding_side = side
    return counts


def finalize(raw_path: Path, out_path: Path) -> dict:
    """Apply the leak filter to a raw generation file and write the corpus (gzipped JSONL)."""
    stats = {"stories": 0, "leaked": 0, "dropped": 0, "kept": 0, "neutral": 0}
    rows = []
    for rec in read_jsonl_raw(raw_path):
        if rec["kind"] == "story":
            stats["stories"] += 1
            text, leaked = clean_story(rec["raw"], rec["emotion"])
            stats["leaked"] += leaked
            if text is None:
                stats["dropped"] += 1
                continue
            stats["kept"] += 1
        else:
            text = rec["raw"].strip()
            if len(text.split()) < 15:
                continue
            stats["neutral"] += 1
        rows.append({"id": rec["id"], "kind": rec["kind"], "topic": rec["topic"],
                     "emotion": rec["emotion"], "text": text, "leaked": rec["kind"] == "story" and leaked})
    stats["leak_rate"] = round(stats["leaked"] / max(stats["stories"], 1), 4)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out_path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return stats


def read_jsonl_raw(path: Path) -> Iterable[dict]:
    """Raw generation records (field 'raw' instead of 'text')."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # torn last line of an interrupted run


def load_corpus(path: Path) -> list[dict]:
    """Corpus records, validated: stories need a known emotion, every row a topic and text."""
    known = set(emotions())
    rows = []
    for rec in read_jsonl(path):
        if rec.get("kind") not in ("story", "message", "neutral"):
            raise ValueError(f"{path}: record {rec['id']} has kind {rec.get('kind')!r} (story, message or neutral)")
        if rec["kind"] != "neutral" and rec.get("emotion") not in known:
            raise ValueError(f"{path}: record {rec['id']} has unknown emotion {rec.get('emotion')!r}")
        if not str(rec["text"]).strip():
            raise ValueError(f"{path}: record {rec['id']} has empty text")
        rows.append(rec)
    if not rows:
        raise ValueError(f"{path}: corpus is empty")
    return rows


def corpus_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["id"], r["text"]], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def shipped_corpus() -> Path:
    """Corpus v2, written by hand to the paper's recipe (probes/data/v2, compiled by
    ``python -m probes.handwritten compile``); read by every model."""
    return Path(str(DATA.joinpath("corpus-v2.jsonl.gz")))

"""Readers for agent logs: every format becomes ``Conversation``s of plain
``{"role", "content", "id"}`` messages, so the scanner knows no format.

Formats: OpenAI chat-completions JSONL (``messages``, ``tool_calls``, ``tool`` results),
Anthropic Messages (top-level ``system``, content blocks, ``tool_use``/``tool_result``),
Inspect eval logs (``.eval`` zips, whose members may be Zstandard-compressed, and
``.json``), OpenTelemetry GenAI spans exported as JSON (``gen_ai.input.messages`` /
``gen_ai.output.messages``) and plain text (one conversation per file).

``read_logs`` yields ``Conversation``s and ``Skipped`` records (a malformed line, member or
file with its location and the reason) in one stream, so nothing is dropped silently.

Readers stream: JSONL is read line by line, ``.eval`` archives member by member from the
front (so a cut archive still gives every member before the cut), OTel and whole-file JSON
one file at a time, so memory holds one record, never the input. Any failure inside a record, from
invalid UTF-8 to JSON nested too deep, skips that record only. Size limits keep one record
from taking the machine: ``MAX_RECORD_BYTES`` per JSONL line or archive member,
``MAX_DOCUMENT_BYTES`` per whole-file document; larger ones are reported, never read.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

MAX_RECORD_BYTES = 64 << 20
MAX_DOCUMENT_BYTES = 256 << 20
FORMATS = ("openai", "anthropic", "inspect", "otel", "text")
ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
         "ai": "assistant", "model": "assistant", "tool": "tool", "function": "tool", "ipython": "tool"}


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # {"role", "content", "id"}; content is non-empty text
    source: str  # where it came from: "file", "file:line" or "file!member"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):  # a lone surrogate (a cut emoji, valid JSON) would fail the tokenizer and the output file
        self.id, self.source = utf8(self.id), utf8(self.source)
        self.messages = [{k: utf8(v) if isinstance(v, str) else v for k, v in m.items()} for m in self.messages]


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8(s: str) -> str:
    """``s`` if it encodes as UTF-8, else with each lone surrogate replaced by U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)


def id_hash(text: str) -> int:
    """8 bytes standing for an id, for the sets that find repeats without holding the ids."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class Skipped:
    source: str
    reason: str


class LogFormatError(ValueError):
    """A record that is valid JSON but not a conversation of the expected format."""


# -- content flattening (shared by every format) ---------------------------------------
def _dump(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)


def tool_call_text(name, arguments) -> str:
    """How a tool call reads to the model: its name and raw arguments."""
    return f"[tool call {name or '?'}] {_dump(arguments if arguments is not None else {})}"


def content_text(content) -> str:
    """Text of a message's content in any format: a string, or a list of parts/blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise LogFormatError(f"content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, dict):
            raise LogFormatError(f"content part must be an object, got {type(part).__name__}")
        kind = part.get("type", "text")
        if kind in ("text", "input_text", "output_text"):
            out.append(str(part.get("text", part.get("content", ""))))
        elif kind in ("thinking", "reasoning"):
            out.append(str(part.get("thinking") or part.get("reasoning") or part.get("content") or part.get("text") or ""))
        elif kind in ("tool_use", "tool_call", "server_tool_use"):
            out.append(tool_call_text(part.get("name"), part.get("input", part.get("arguments"))))
        elif kind in ("tool_result", "tool_call_response"):
            out.append(content_text(part.get("content", part.get("response"))))
        elif kind in ("image", "image_url", "input_image", "audio", "document", "file", "blob", "uri"):
            out.append(f"[{kind}]")
        else:  # unknown part: keep whatever text it carries
            out.append(str(part.get("text", part.get("content", ""))))
    return "\n".join(s for s in out if s)


def _message(role, content, mid=None) -> dict | None:
    role = ROLES.get(str(role).lower(), str(role).lower()) if role else "user"
    text = content.strip("\n") if isinstance(content, str) else content
    return {"role": role, "content": text, "id": mid} if text and text.strip() else None


def _keep(messages: Iterable[dict | None]) -> list[dict]:
    return [m for m in messages if m]


# -- OpenAI chat completions ------------------------------------------------------------
def openai_messages(record: dict) -> list[dict]:
    """``{"messages": [...]}`` (optionally with the reply in ``choices``/``response``)."""
    msgs = _chat_list(record)
    reply = _reply(record)
    if reply is not None:
        msgs = msgs + [reply]
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise LogFormatError(f"messages[{k}] has no 'role'")
        text = content_text(m.get("content"))
        calls = m.get("tool_calls") or []
        if m.get("function_call"):
            calls = calls + [{"function": m["function_call"]}]
        for c in calls:
            fn = c.get("function", c) if isinstance(c, dict) else {}
            text += ("\n" if text else "") + tool_call_text(fn.get("name"), fn.get("arguments"))
        out.append(_message(m["role"], text, m.get("id") or m.get("tool_call_id")))
    return _keep(out)


def _chat_list(record: dict) -> list:
    body = record.get("request", record) if isinstance(record.get("request"), dict) else record
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise LogFormatError("no 'messages' list")
    return msgs


def _reply(record: dict):
    """The logged reply of a request/response record, if any."""
    resp = record.get("response")
    choices = record.get("choices")
    if choices is None and isinstance(resp, dict):
        choices = resp.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict) and isinstance(choices[0].get("message"), dict):
        return choices[0]["message"]
    if isinstance(resp, dict) and resp.get("role") == "assistant" and "content" in resp:
        return resp  # Anthropic-style reply object
    return None


# -- Anthropic Messages -----------------------------------------------------------------
def anthropic_messages(record: dict) -> list[dict]:
    """``{"system": ..., "messages": [...]}``; ``tool_result`` blocks become ``tool`` messages."""
    body = record.get("request", record) if isinstance(record.get("request"), dict) else record
    out = [_message("system", content_text(body.get("system")))] if body.get("system") else []
    msgs = _chat_list(record)
    reply = _reply(record)
    if reply is not None:
        msgs = msgs + [reply]
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise LogFormatError(f"messages[{k}] has no 'role'")
        blocks = m.get("content")
        if not isinstance(blocks, list):
            out.append(_message(m["role"], content_text(blocks), m.get("id")))
            continue
        pending = []  # consecutive non-result blocks form one message
        for b in blocks:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                out.append(_message(m["role"], content_text(pending), m.get("id")))
                pending = []
                err = "[error] " if b.get("is_error") else ""
                out.append(_message("tool", err + content_text(b.get("content")), b.get("tool_use_id")))
            else:
                pending.append(b)
        out.append(_message(m["role"], content_text(pending), m.get("id")))
    return _keep(out)


def _is_anthropic(record: dict) -> bool:
    body = record.get("request", record) if isinstance(record.get("request"), dict) else record
    if "system" in body or record.get("type") == "message":
        return True
    for m in _dicts(body.get("messages")):
        for b in _dicts(m.get("content")):
            if b.get("type") in ("tool_use", "tool_result", "thinking"):
                return True
    return False


# -- Inspect eval logs ------------------------------------------------------------------
ZSTD = 93  # zip method id of Zstandard; Python's zipfile (before 3.14) cannot read it


SAMPLE = re.compile(r"samples/[^/]+\.json")


def inflate(method: int, raw: bytes, size: int, crc: int) -> bytes:
    """A member's bytes from its compressed data (stored, deflate or Zstandard), checked
    against its size and CRC."""
    if size > MAX_RECORD_BYTES:
        raise LogFormatError(f"member of {size} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    if method == 0:
        data = raw
    elif method == zipfile.ZIP_DEFLATED:
        import zlib

        try:
            data = zlib.decompressobj(-15).decompress(raw, size + 1)
        except zlib.error as e:
            raise LogFormatError(f"corrupt deflate data ({e})") from None
    elif method == ZSTD:
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=size)
        except zstandard.ZstdError as e:
            raise LogFormatError(f"corrupt Zstandard data ({e})") from None
    else:
        raise LogFormatError(f"unsupported compression method {method}")
    if len(data) != size or zipfile.crc32(data) != crc:
        raise LogFormatError("corrupt member (size or CRC mismatch)")
    return data


def local_members(f) -> Iterator[tuple[int, str | None, bytes | Exception]]:
    """(offset, name, bytes or why they are unreadable) of each member of a zip, read front
    to back from the local headers, one at a time. When it cannot go on (damage, a cut, a
    member whose sizes trail its data) it gives ``(offset, None, why)`` and stops."""
    while True:
        offset = f.tell()
        head = f.read(30)
        if not head or head[:4] in (b"PK\x01\x02", b"PK\x05\x06"):  # the central directory: done
            return
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            yield offset, None, LogFormatError("no member header where one should start")
            return
        _, flags, method, _, _, crc, csize, usize, nlen, xlen = struct.unpack("<HHHHHIIIHH", head[4:30])
        name = f.read(nlen).decode("utf-8", "replace")
        f.seek(xlen, 1)
        if flags & 0x08 or 0xFFFFFFFF in (csize, usize):
            yield offset, None, LogFormatError("a member's sizes follow its data (data descriptor or zip64)")
            return
        if csize > MAX_RECORD_BYTES:
            f.seek(csize, 1)
            yield offset, name, LogFormatError(f"member of {csize} bytes is over the {MAX_RECORD_BYTES}-byte limit")
            continue
        raw = f.read(csize)
        if len(raw) < csize:
            yield offset, None, LogFormatError(f"the archive ends inside member {name}")
            return
        try:
            yield offset, name, inflate(method, raw, usize, crc)
        except LogFormatError as e:
            yield offset, name, e


def inspect_messages(sample: dict) -> list[dict]:
    """An Inspect ``EvalSample``: its ``messages`` (content parts, tool calls, tool errors)."""
    msgs = sample.get("messages")
    if not isinstance(msgs, list):
        raise LogFormatError("sample has no 'messages' list")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise LogFormatError(f"messages[{k}] has no 'role'")
        text = content_text(m.get("content"))
        for c in m.get("tool_calls") or []:
            text += ("\n" if text else "") + tool_call_text(c.get("function"), c.get("arguments"))
        if isinstance(m.get("error"), dict) and m["error"].get("message"):
            text += ("\n" if text else "") + f"[error] {m['error']['message']}"
        out.append(_message(m["role"], text, m.get("id")))
    return _keep(out)


def _sample_id(sample: dict, fallback: str) -> str:
    sid = sample.get("id", fallback)
    return f"{sid}/epoch{sample['epoch']}" if "epoch" in sample else str(sid)


def _sample(data: bytes, where: str, member: str, name: str) -> Conversation | Skipped:
    try:
        sample = json.loads(data)
        if not isinstance(sample, dict):
            raise LogFormatError("sample is not a JSON object")
        return Conversation(f"{name}#{_sample_id(sample, Path(member).stem)}", inspect_messages(sample), where)
    except Exception as e:  # one bad sample, whatever is wrong with it, skips that sample only
        return Skipped(where, _why(e))


def read_inspect_eval(path: Path, name: str) -> Iterator[Conversation | Skipped]:
    """Samples in the order the archive's central directory lists them, each read when its
    turn comes: memory holds one sample and 8 bytes per member name, however many the
    archive holds. A name written twice (Inspect supersedes a requeued sample that way)
    counts once, its last entry. An archive whose directory is cut off or damaged is read
    front to back from its local headers: every member before the damage is kept."""
    with open(path, "rb") as f:
        try:
            superseded = _superseded(f)
        except Exception as e:  # whatever is wrong with the directory, the members may still be readable
            yield from _front_to_back(f, name, e)
            return
        found = 0
        for member, offset, method, crc, csize, usize in _directory(f):
            if not SAMPLE.fullmatch(member) or offset in superseded:
                continue
            found += 1
            where = f"{name}!{member}"
            try:
                data = _member_at(f, offset, method, crc, csize, usize)
            except Exception as e:
                yield Skipped(where, _why(e))
                continue
            yield _sample(data, where, member, name)
    if not found:
        yield Skipped(name, "no samples/*.json in the .eval archive")


def _front_to_back(f, name: str, error: Exception) -> Iterator[Conversation | Skipped]:
    f.seek(0)
    found, stop = 0, None
    for offset, member, data in local_members(f):
        if member is None:
            stop = f" before byte {offset}, where {data}"
            break
        if SAMPLE.fullmatch(member):
            found += 1
            where = f"{name}!{member}"
            yield Skipped(where, _why(data)) if isinstance(data, Exception) else _sample(data, where, member, name)
    yield Skipped(name, f"damaged .eval zip ({error}); {found} sample member(s) read from the front{stop or ''}"
                  if found else f"not a readable .eval zip ({error})")


def _directory(f) -> Iterator[tuple[str, int, int, int, int, int]]:
    """(name, local header offset, method, CRC, compressed and full size) of each central
    directory entry, read from disk one at a time (zip64 included)."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(max(0, size - 22 - 65535))
    tail_at = f.tell()
    tail = f.read()
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        raise LogFormatError("no end-of-directory record (cut short?)")
    _, _, _, count, cd_size, cd_offset, _ = struct.unpack("<HHHHIIH", tail[i + 4:i + 22])
    end = tail_at + i
    if count == 0xFFFF or cd_offset == 0xFFFFFFFF:  # zip64: the real numbers are in the zip64 record
        loc = tail[i - 20:i] if i >= 20 else b""
        if loc[:4] != b"PK\x06\x07":
            raise LogFormatError("zip64 archive without its locator")
        f.seek(struct.unpack("<Q", loc[8:16])[0])
        rec = f.read(56)
        if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
            raise LogFormatError("zip64 end-of-directory record missing")
        count, cd_size, cd_offset = struct.unpack("<QQQ", rec[32:56])
        end = f.seek(0, 1) - 56
    base = end - cd_size - cd_offset  # bytes prepended to the archive, as zipfile allows
    if base < 0:
        raise LogFormatError("central directory points outside the file")
    pos = base + cd_offset
    for _ in range(count):
        f.seek(pos)
        h = f.read(46)
        if len(h) < 46 or h[:4] != b"PK\x01\x02":
            raise LogFormatError(f"damaged central directory at byte {pos}")
        _, _, _, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, offset = struct.unpack("<HHHHHHIIIHHHHHII", h[4:46])
        member = f.read(nlen).decode("utf-8", "replace")
        if 0xFFFFFFFF in (csize, usize, offset):
            raise LogFormatError(f"member {member} needs zip64 sizes (over 4 GB)")
        pos += 46 + nlen + xlen + clen
        yield member, base + offset, method, crc, csize, usize


def _superseded(f) -> set[int]:
    """Offsets of the entries a later entry of the same name replaces (one pass over the
    directory keeping 8-byte name hashes)."""
    first: dict[int, int] = {}
    out: set[int] = set()
    for member, offset, *_ in _directory(f):
        h = id_hash(member)
        if h in first:
            out.add(first[h])
        first[h] = offset
    return out


def _member_at(f, offset: int, method: int, crc: int, csize: int, usize: int) -> bytes:
    f.seek(offset)
    head = f.read(30)
    if head[:4] != b"PK\x03\x04":
        raise LogFormatError("bad local header")
    nlen, xlen = struct.unpack("<HH", head[26:30])
    f.seek(offset + 30 + nlen + xlen)
    if csize > MAX_RECORD_BYTES:
        raise LogFormatError(f"member of {csize} bytes is over the {MAX_RECORD_BYTES}-byte limit")
    return inflate(method, f.read(csize), usize, crc)


def read_inspect_json(doc: dict, name: str) -> Iterator[Conversation | Skipped]:
    samples = doc.get("samples")
    if not isinstance(samples, list):
        yield Skipped(name, "Inspect log without a 'samples' list (header only?)")
        return
    for k, sample in enumerate(samples):
        where = f"{name}:samples[{k}]"
        try:
            if not isinstance(sample, dict):
                raise LogFormatError("sample is not a JSON object")
            yield Conversation(f"{name}#{_sample_id(sample, str(k))}", inspect_messages(sample), where)
        except Exception as e:
            yield Skipped(where, _why(e))


# -- OpenTelemetry GenAI spans ----------------------------------------------------------
def _attr_value(v):
    if isinstance(v, dict) and len(v) == 1:  # OTLP JSON: {"stringValue": ...}, {"intValue": ...}, ...
        (kind, inner), = v.items()
        if kind == "arrayValue":
            return [_attr_value(x) for x in inner.get("values", [])]
        if kind.endswith("Value"):
            return inner
    return v


def span_attributes(span: dict) -> dict:
    attrs = span.get("attributes") or {}
    if isinstance(attrs, list):  # OTLP: [{"key": ..., "value": {...}}]
        attrs = {a.get("key"): _attr_value(a.get("value")) for a in attrs if isinstance(a, dict)}
    return attrs if isinstance(attrs, dict) else {}


def _dicts(x) -> list[dict]:
    return [d for d in x if isinstance(d, dict)] if isinstance(x, list) else []


def _spans(doc) -> list[dict]:
    """Every span object of an OTel export, in any of its shapes (anything else is passed over)."""
    if isinstance(doc, list):
        return [s for d in _dicts(doc) for s in _spans(d)] if any("resourceSpans" in d for d in _dicts(doc)) \
            else _dicts(doc)
    if not isinstance(doc, dict):
        return []
    if "resourceSpans" in doc:
        return [s for rs in _dicts(doc["resourceSpans"])
                for ss in _dicts(rs.get("scopeSpans", rs.get("instrumentationLibrarySpans"))) for s in _dicts(ss.get("spans"))]
    if isinstance(doc.get("spans"), list):
        return _dicts(doc["spans"])
    return [doc]


def otel_messages(attrs: dict) -> list[dict]:
    """Messages of one GenAI span: system instructions, input and output messages."""
    def parsed(key):
        v = attrs.get(key)
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                raise LogFormatError(f"attribute {key} is not valid JSON") from None
        return v or []

    out = []
    system = parsed("gen_ai.system_instructions")
    if system:
        out.append(_message("system", content_text(system)))
    for key in ("gen_ai.input.messages", "gen_ai.output.messages"):
        msgs = parsed(key)
        if not isinstance(msgs, list):
            raise LogFormatError(f"attribute {key} is not a list of messages")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise LogFormatError(f"{key}[{k}] has no 'role'")
            parts = m.get("parts", m.get("content"))
            out.append(_message(m["role"], content_text(parts)))
    return _keep(out)


def read_otel(doc, name: str) -> Iterator[Conversation | Skipped]:
    """One conversation per ``gen_ai.conversation.id`` (else per trace): the span that
    holds the most messages, since each call's input repeats the history before it."""
    best: dict[str, tuple[int, list, str]] = {}
    genai = 0
    for k, span in enumerate(_spans(doc)):
        where = f"{name}:span[{k}]"
        try:
            attrs = span_attributes(span)
            if not any(a in attrs for a in ("gen_ai.input.messages", "gen_ai.output.messages")):
                continue
            genai += 1
            msgs = otel_messages(attrs)
            ctx = span.get("context") if isinstance(span.get("context"), dict) else {}
            group = str(attrs.get("gen_ai.conversation.id") or span.get("traceId") or ctx.get("trace_id")
                        or span.get("spanId") or ctx.get("span_id") or k)
        except Exception as e:
            yield Skipped(where, _why(e))
            continue
        if group not in best or len(msgs) >= best[group][0]:
            best[group] = (len(msgs), msgs, where)
    if not genai:
        yield Skipped(name, "no span with gen_ai.input.messages / gen_ai.output.messages")
    for group, (_, msgs, where) in best.items():
        yield Conversation(f"{name}#{group}", msgs, where)


def _is_otel(doc) -> bool:
    if isinstance(doc, dict) and "resourceSpans" in doc:
        return True
    spans = _spans(doc) if isinstance(doc, (dict, list)) else []
    return any(isinstance(k, str) and k.startswith("gen_ai.") for s in spans[:50] for k in span_attributes(s))


# -- plain text -------------------------------------------------------------------------
_TURN = re.compile(r"^(system|user|human|assistant|ai|tool)\s*:\s?", re.I | re.M)


def text_messages(text: str) -> list[dict]:
    """``Role: ...`` turns when the file has them, else the whole text as one user message."""
    marks = list(_TURN.finditer(text))
    if not marks:
        return _keep([_message("user", text)])
    out = [_message("user", text[:marks[0].start()])]
    for m, nxt in zip(marks, marks[1:] + [None]):
        out.append(_message(m.group(1), text[m.end():nxt.start() if nxt else len(text)]))
    return _keep(out)


# -- files and detection ----------------------------------------------------------------
def _why(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return f"invalid UTF-8 at byte {e.start}"
    return f"{type(e).__name__}: {e}" if not isinstance(e, LogFormatError) else str(e)


def _lines(f) -> Iterator[tuple[int, bytes | LogFormatError]]:
    """(line number, bytes) of a binary file, one line at a time; a line over
    MAX_RECORD_BYTES is read past in pieces, never held, and given as its error."""
    n = 0
    while True:
        raw = f.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_RECORD_BYTES:
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
                size += len(raw)
            yield n, LogFormatError(f"line of {size} bytes is over the {MAX_RECORD_BYTES}-byte record limit")
        else:
            yield n, raw


def _first_record(path: Path) -> tuple[bytes, bool]:
    """The first non-blank line (up to MAX_RECORD_BYTES) and whether anything follows it."""
    with open(path, "rb") as f:
        for _, raw in _lines(f):
            if isinstance(raw, Exception):
                return b"", True
            if raw.strip():
                return raw, bool(f.read(1 << 16).strip())
    return b"", False


def _parse(raw: bytes):
    """A JSON value from raw bytes, or None when they are not one."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def read_document(path: Path, errors: str = "strict") -> str:
    """A whole file as text, refused past MAX_DOCUMENT_BYTES (a JSON document or a text
    transcript is one record; logs that big belong in JSONL, which streams)."""
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise LogFormatError(f"a single {size}-byte document is over the {MAX_DOCUMENT_BYTES}-byte limit "
                             "(write big logs as JSONL, one conversation per line)")
    return path.read_bytes().decode("utf-8", errors)


def detect(path: Path) -> str:
    """The format of a file, from its extension and first record."""
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        magic = f.read(4)
    jsonl = suffix in (".jsonl", ".ndjson")
    if suffix == ".eval" or (magic == b"PK\x03\x04" and not jsonl):
        return "inspect"
    first, _ = _first_record(path)
    doc = _parse(first)  # JSONL: decide from the first record
    if jsonl:  # never text or a zip: a bad first line is that line's problem, reported alone
        return "anthropic" if isinstance(doc, dict) and _is_anthropic(doc) else "openai"
    if suffix in (".txt", ".md", ".log") or first.lstrip()[:1] not in (b"{", b"["):
        return "text"
    if not isinstance(doc, (dict, list)):
        try:
            doc = json.loads(read_document(path))  # a pretty-printed document
        except (ValueError, RecursionError):
            return "openai"  # unreadable as a whole: the JSONL reader reports each bad line
    if isinstance(doc, dict) and ("eval" in doc and ("samples" in doc or "version" in doc)):
        return "inspect"
    if _is_otel(doc):
        return "otel"
    records = doc if isinstance(doc, list) else [doc]
    return "anthropic" if any(isinstance(r, dict) and _is_anthropic(r) for r in records[:20]) else "openai"


def _chat_records(path: Path, name: str) -> Iterator[tuple[str, str, object]]:
    """(local id, location, record or the error that spoiled it) of a chat file: JSON lines
    (read one at a time), else one JSON document (a list of records or one record)."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        first, more = _first_record(path)
        doc = None
        if not (more and _parse(first) is not None):  # not JSON lines: one document
            try:
                doc = json.loads(read_document(path))  # a document over the size limit is refused whole
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                doc = None  # read it as lines, so each bad line is reported
        if doc is not None:
            records = doc if isinstance(doc, list) else [doc]
            for k, r in enumerate(records):
                where = f"{name}:[{k}]" if isinstance(doc, list) else name
                yield (str(r.get("id", k)) if isinstance(r, dict) else str(k)), where, r
            return
    with open(path, "rb") as f:
        for n, raw in _lines(f):
            where = f"{name}:{n}"
            if isinstance(raw, Exception):
                yield str(n), where, raw
                continue
            if not raw.strip():
                continue
            try:
                r = json.loads(raw.decode("utf-8"))
            except json.JSONDecodeError as e:
                yield str(n), where, LogFormatError(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            except (ValueError, RecursionError) as e:
                yield str(n), where, e
                continue
            yield (str(r.get("id", f"line{n}")) if isinstance(r, dict) else str(n)), where, r


def read_file(path: str | Path, fmt: str | None = None) -> Iterator[Conversation | Skipped]:
    """Conversations of one file (``fmt`` forces a format; default: detected)."""
    name = str(path)
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose from {', '.join(FORMATS)}")
    forced = fmt is not None
    try:
        fmt = fmt or detect(path)
    except OSError as e:
        yield Skipped(name, f"cannot read ({e.strerror or e})")
        return
    try:
        if fmt == "inspect" and (path.suffix.lower() == ".eval" or zipfile.is_zipfile(path)):
            yield from read_inspect_eval(path, name)
        elif fmt == "text":  # one conversation: a bad byte is replaced, not worth losing the transcript
            msgs = text_messages(read_document(path, errors="replace"))
            yield Conversation(name, msgs, name) if msgs else Skipped(name, "empty text file")
        elif fmt in ("inspect", "otel"):
            doc = json.loads(read_document(path))
            if fmt == "inspect" and not isinstance(doc, dict):
                raise LogFormatError("an Inspect .json log must be one JSON object")
            yield from (read_inspect_json if fmt == "inspect" else read_otel)(doc, name)
        else:
            yield from _read_chat(path, name, fmt if forced else None)
    except Exception as e:  # whatever is wrong with the file skips the rest of that file only
        yield Skipped(name, _why(e))


def _read_chat(path: Path, name: str, fmt: str | None) -> Iterator[Conversation | Skipped]:
    """OpenAI or Anthropic records; without ``fmt``, decided per record (a file may mix them)."""
    seen: set[int] = set()  # id hashes so far: a duplicate id gets its line appended
    for local, where, record in _chat_records(path, name):
        if isinstance(record, Exception):
            yield Skipped(where, _why(record))
            continue
        try:
            if not isinstance(record, dict):
                raise LogFormatError("record is not a JSON object")
            anthropic = fmt == "anthropic" if fmt else _is_anthropic(record)
            msgs = (anthropic_messages if anthropic else openai_messages)(record)
            cid = f"{name}#{local}" if id_hash(local) not in seen else f"{name}#{local}@{where.rsplit(':', 1)[-1]}"
            meta = {k: record[k] for k in ("metadata",) if k in record}
        except Exception as e:  # one bad record, whatever is wrong with it, skips that record only
            yield Skipped(where, _why(e) if isinstance(e, LogFormatError) else f"malformed record ({_why(e)})")
            continue
        seen.add(id_hash(local))
        yield Conversation(cid, msgs, where, meta)


def read_logs(paths: Iterable[str | Path], fmt: str | None = None) -> Iterator[Conversation | Skipped]:
    """All conversations of all files, in order; directories are read recursively.
    A conversation without messages is reported, not yielded."""
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            if not f.exists():
                yield Skipped(str(f), "no such file")
                continue
            for item in read_file(f, fmt):
                if isinstance(item, Conversation) and not item.messages:
                    yield Skipped(item.source, "conversation has no messages with text")
                else:
                    yield item

"""Read emotions with onnxruntime alone: no torch, no model weights beyond the export.

``load(path)`` returns an ``OnnxReader`` with the interface of ``probes.reader.TorchReader``.
Everything it needs is in the export directory: the graph, ``card.json`` and the
tokenizer files. Each ONNX file also carries the card's facts in ``metadata_props``, so
a file moved out of its directory still knows its labels and model.
"""
from __future__ import annotations

import hashlib

import json
from pathlib import Path

import numpy as np

from probes.bank import ProbeBank
from probes.models import ModelError, check_fingerprint, tokenizer_hash
from probes.reader import BaseReader

CARD = "card.json"
CARD_FORMAT = 1
MONITOR, MONITOR_INT8, HEAD = "monitor.onnx", "monitor.int8.onnx", "head.onnx"
# metadata_props keys; values are JSON
META_KEYS = ("emoprobe_format", "graph", "labels", "layer", "model", "readout", "outputs", "opset",
             "vocab_size", "max_len", "calibration", "emoprobe_version")


def find_export(path: str | Path) -> Path:
    """A run directory, an export directory or a path inside one -> the export directory."""
    path = Path(path)
    for d in (path, path / "export", path.parent):
        if (d / CARD).is_file():
            return d
    if path.is_dir() or path.suffix != ".onnx":
        raise FileNotFoundError(f"no ONNX export in {path} (expected {CARD}): run `emoprobe export --run RUN`")
    return path.parent


def read_card(directory: Path) -> dict | None:
    file = directory / CARD
    if not file.is_file():
        return None
    try:
        card = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(card, dict) or card.get("emoprobe_format", 0) > CARD_FORMAT:
        raise ValueError(f"{file}: not an emoprobe export card of format <= {CARD_FORMAT}")
    return card


def file_entry(path: Path) -> dict:
    """What the card records of each exported file, and what loading checks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def open_session(file: Path, card: dict | None = None, threads: int | None = None):
    """An onnxruntime session; a file shorter than the card says, or one onnxruntime
    cannot parse, is refused with a one-line error instead of a protobuf traceback."""
    import onnxruntime as ort

    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such ONNX file")
    expected = ((card or {}).get("files") or {}).get(file.name) or {}
    if expected and file_entry(file) != {k: expected.get(k) for k in ("bytes", "sha256")}:
        raise ValueError(f"{file}: its size or sha256 is not the one {CARD} records: "
                         "the file is truncated or was replaced; export again")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a readable ONNX model (truncated or corrupt?): {first[:300]}") from None


def session_meta(session, file: Path, graph: str) -> dict:
    """The emoprobe facts stored in the file's ``metadata_props``."""
    raw = session.get_modelmeta().custom_metadata_map
    if "model" not in raw or "labels" not in raw:
        raise ValueError(f"{file}: not an emoprobe export (no emoprobe metadata in the ONNX file)")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k in META_KEYS}
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed emoprobe metadata ({e})") from None
    if meta.get("graph") != graph:
        raise ValueError(f"{file}: holds the {meta.get('graph')!r} graph, expected {graph!r}")
    return meta


def check_same_model(meta: dict, card: dict | None, file: Path) -> None:
    """Refuse an ONNX file whose metadata names another model than the card beside it."""
    if card is not None:
        check_fingerprint(card["model"], meta["model"], what=f"the export in {file.parent}")
        if meta["labels"] != card["labels"] or meta["layer"] != card["layer"]:
            raise ModelError(f"{file}: labels or read layer differ from {file.parent / CARD}: "
                             "the file comes from another export")


def check_tokenizer(tokenizer, model: dict, file: Path) -> None:
    got = tokenizer_hash(tokenizer)
    if got != model.get("tokenizer_sha"):
        raise ModelError(f"{file} was exported for the tokenizer of '{model.get('name')}' "
                         f"(tokenizer_sha {model.get('tokenizer_sha')}), but the tokenizer given hashes to {got}: "
                         "use that model's tokenizer")


def load_tokenizer(directory: Path, model: dict):
    """The tokenizer saved with the export (no torch import), else the model's own."""
    from transformers import PreTrainedTokenizerFast

    local = directory / "tokenizer"
    if not (local / "tokenizer.json").is_file():
        from probes.models import resolve

        _, local = resolve(model["name"])
    tok = PreTrainedTokenizerFast.from_pretrained(str(local))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class OnnxHead:
    """head.onnx: ``hidden`` [batch, tokens, hidden] -> scores (and risk) as numpy."""

    def __init__(self, path: str | Path, threads: int | None = None):
        file = Path(path)
        if file.is_dir():
            file = find_export(file) / HEAD
        self.card = read_card(file.parent)
        self.session = open_session(file, self.card, threads)
        self.meta = session_meta(self.session, file, "head")
        check_same_model(self.meta, self.card, file)
        self.file, self.labels = file, self.meta["labels"]
        self.hidden_size = int(self.meta["model"]["hidden_size"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, hidden) -> dict[str, np.ndarray]:
        """{"scores": [B, T, n], "risk": [B, T] when the bank has a risk calibrator}."""
        h = np.asarray(hidden, dtype=np.float32)
        if h.ndim != 3 or h.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape [batch, tokens, {self.hidden_size}], got {list(h.shape)}")
        return dict(zip(self.outputs, self.session.run(None, {"hidden": h})))


class OnnxReader(BaseReader):
    """A reader backed by monitor.onnx (or monitor.int8.onnx): same interface as
    ``TorchReader``; long texts are read in overlapping windows like the torch reader."""

    def __init__(self, path: str | Path, tokenizer=None, int8: bool = False, threads: int | None = None,
                 batch_size: int = 16):
        path = Path(path)
        file = path if path.suffix == ".onnx" else find_export(path) / (MONITOR_INT8 if int8 else MONITOR)
        self.card = read_card(file.parent)
        self.session = open_session(file, self.card, threads)
        self.meta = meta = session_meta(self.session, file, "monitor")
        check_same_model(meta, self.card, file)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(file.parent, meta["model"])
        check_tokenizer(self.tokenizer, meta["model"], file)
        self.file, self.batch_size = file, batch_size
        self.vocab_size, self.max_len = int(meta["vocab_size"]), int(meta["max_len"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        extra = {"calibration": meta["calibration"]} if meta.get("calibration") else {}
        tensors = {}
        if self.card and self.card.get("alert_threshold"):
            tensors["alert_threshold"] = np.asarray(self.card["alert_threshold"], np.float32)
        self.bank = ProbeBank(meta["labels"], int(meta["layer"]), meta["model"], tensors,
                              meta.get("readout", "vectors"), extra)

    @property
    def has_risk(self) -> bool:
        return "risk" in self.outputs

    @property
    def spec(self) -> str:
        """What reads (as ``TorchReader.spec``): the graph file."""
        return f"onnx:{self.file.name}"

    # -- one forward pass -------------------------------------------------------------
    def run(self, input_ids, attention_mask) -> dict[str, np.ndarray]:
        """The graph on a padded batch [B, T] (int64): {"scores": [B, T, n], "risk": [B, T]}."""
        ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids and attention_mask must both have shape [batch, tokens], "
                             f"got {list(ids.shape)} and {list(mask.shape)}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} out of range: the model's vocabulary has ids 0..{self.vocab_size - 1}")
        if np.any((mask != 0) & (mask != 1)):
            raise ValueError("attention_mask must hold only 0 and 1")
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def forward(self, ids, mask):
        return self.run(ids, mask)

    def risk_ids(self, seqs) -> list[np.ndarray]:
        """Per-token risk [tokens] of each sequence (needs a calibrated bank's export)."""
        if not self.has_risk:
            raise ValueError(f"{self.file} has no risk output: calibrate the bank (`emoprobe calibrate`) "
                             "and export again")
        return [r["risk"] for r in self.read_ids(seqs)]


def load(path: str | Path, tokenizer=None, int8: bool = False, threads: int | None = None,
         batch_size: int = 16) -> OnnxReader:
    """An onnxruntime reader for a run directory, its ``export/`` directory or an ONNX
    file. Refuses a tokenizer, card or file that belongs to another model."""
    return OnnxReader(path, tokenizer, int8=int8, threads=threads, batch_size=batch_size)


def load_head(path: str | Path, threads: int | None = None) -> OnnxHead:
    return OnnxHead(path, threads)

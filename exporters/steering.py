"""Emotion vectors as llama.cpp control vectors (GGUF), one file per emotion.

llama.cpp's format: ``general.architecture = "controlvector"``, one 1-d F32 tensor
``direction.{k}`` per layer, optional ``controlvector.model_hint`` / ``layer_count``
(its loader reads only the tensors). ``direction.k`` is added to the output of decoder
block k, 0-based (``build_cvec(cur, il)`` after the block's last residual add): the
same numbering as emoprobe's ``layer k``. llama.cpp rejects ``direction.0``, so layer 0
cannot be steered from llama.cpp and is left out.

A file holds one control vector, so each emotion gets its own file. Directions are
scaled by the layer's mean residual norm: ``--control-vector-scaled FILE 0.05`` in
llama.cpp adds the same vector as ``emoprobe watch --steer EMOTION=0.05``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from probes.bank import ProbeBank


def slug(emotion: str) -> str:
    """A file name for an emotion label ("at ease" -> "at_ease")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", emotion).strip("_") or "emotion"


def write_control_vector(path: str | Path, directions: dict[int, np.ndarray], model_hint: str,
                         extra: dict[str, str] | None = None) -> Path:
    """Write ``{layer k: vector [D]}`` as a llama.cpp control vector (k >= 1)."""
    import gguf

    if not directions:
        raise ValueError("a control vector needs at least one layer")
    if min(directions) < 1:
        raise ValueError("llama.cpp control vectors cannot hold layer 0 (direction.0 is rejected)")
    dims = {np.asarray(v).shape for v in directions.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"control vector directions must all be 1-d of one size, got shapes {sorted(dims)}")
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_int32("controlvector.layer_count", len(directions))
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    for k in sorted(directions):
        writer.add_tensor(f"direction.{k}", np.ascontiguousarray(directions[k], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def read_control_vector(path: str | Path) -> dict[int, np.ndarray]:
    """``{layer: vector}`` from a control-vector GGUF (for checks and round trips)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields.get("general.architecture")
    if arch is None or bytes(arch.parts[arch.data[0]]).decode() != "controlvector":
        raise ValueError(f"{path}: not a llama.cpp control vector (general.architecture != 'controlvector')")
    out = {}
    for t in reader.tensors:
        name, _, k = t.name.partition(".")
        if name != "direction" or not k.isdigit():
            raise ValueError(f"{path}: unexpected tensor {t.name!r}")
        out[int(k)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    return out


def write_steering(directory: str | Path, bank: ProbeBank, residual_norms) -> dict:
    """``directory/<emotion>.gguf`` for every label; returns the card entry."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lv = np.asarray(bank.tensors["layer_vectors"], np.float64)  # [L, n, D]
    norms = np.asarray(residual_norms, np.float64)
    if lv.ndim != 3 or lv.shape[1] != len(bank.labels) or norms.shape != (lv.shape[0],):
        raise ValueError(f"layer_vectors {lv.shape} / residual norms {norms.shape} do not match the bank's "
                         f"{len(bank.labels)} labels")
    length = np.linalg.norm(lv, axis=-1)  # [L, n]
    files = {}
    for j, emotion in enumerate(bank.labels):
        layers = [k for k in range(1, lv.shape[0]) if np.isfinite(length[k, j]) and length[k, j] > 0]
        if not layers:
            continue
        dirs = {k: lv[k, j] / length[k, j] * norms[k] for k in layers}
        name = f"{slug(emotion)}.gguf"
        if name in files.values():
            raise ValueError(f"two labels map to the file name {name}; rename one of them")
        extra = {"emoprobe.emotion": emotion, "emoprobe.tokenizer_sha": str(bank.model.get("tokenizer_sha")),
                 "emoprobe.unit": "unit direction x the layer's mean residual norm"}
        write_control_vector(directory / name, dirs, str(bank.model.get("architecture", "")), extra)
        files[emotion] = name
    return {"directory": directory.name, "files": files, "layers": "1..%d" % (lv.shape[0] - 1),
            "residual_norms": [float(x) for x in norms],
            "unit": "strength 1.0 adds the layer's mean residual norm (as `emoprobe watch --steer E=1.0`)",
            "layer_numbering": "direction.k = output of decoder block k (0-based), as llama.cpp applies it; "
                               "layer 0 is not expressible"}

"""The probe bank: everything a readout needs, in safetensors + JSON (no pickle).

A readout is one affine map of the read layer's residual stream ``h``::

    scores = h @ weight.T + bias            # [.., n_emotions]

where ``weight``/``bias`` fold together the per-dimension standardization, the chosen
readout (denoised emotion vectors or the trained probe) and the calibration baseline
(z-scores against ordinary text). ``head()`` builds that map; the torch reader, the
ONNX exporter and the live monitor all use it, so they agree by construction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .models import check_fingerprint

FORMAT_VERSION = 1
REQUIRED_TENSORS = ("vectors", "directions", "dim_mean", "dim_scale", "probe_coef", "probe_intercept",
                    "score_mean", "score_std", "layer_vectors")


class BankError(ValueError):
    """A bank file is missing, malformed or made for another model."""


@dataclass
class ProbeBank:
    labels: list[str]
    layer: int
    model: dict
    tensors: dict[str, np.ndarray]
    readout: str = "vectors"  # "vectors" (paper's projection), "lda" or "probe" (trained maps)
    meta: dict = field(default_factory=dict)  # build settings, metrics, calibration summary

    # -- the readout ---------------------------------------------------------------
    def raw_head(self) -> tuple[np.ndarray, np.ndarray]:
        """Affine map of raw activations to uncalibrated scores."""
        t = self.tensors
        if self.readout in ("probe", "lda"):
            return t["probe_coef"], t["probe_intercept"]
        W = t["directions"] / t["dim_scale"]
        return W, -W @ t["dim_mean"]

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """Affine map of raw activations to calibrated z-scores: ``(weight, bias)``."""
        W, b = self.raw_head()
        mu, sd = self.tensors["score_mean"], self.tensors["score_std"]
        return (W / sd[:, None]).astype(np.float32), ((b - mu) / sd).astype(np.float32)

    @property
    def calibrated(self) -> bool:
        return "calibration" in self.meta

    def index(self, emotion: str) -> int:
        try:
            return self.labels.index(emotion)
        except ValueError:
            raise KeyError(f"unknown emotion {emotion!r}; the bank has {len(self.labels)} labels") from None

    def steering_vector(self, emotion: str, layer: int | None = None) -> np.ndarray:
        """Unit direction in raw residual space for ``emotion`` at ``layer`` (default read layer)."""
        layer = self.layer if layer is None else layer
        lv = self.tensors["layer_vectors"]
        if not 0 <= layer < lv.shape[0]:
            raise ValueError(f"no vectors for layer {layer}; the bank has layers 0..{lv.shape[0] - 1}")
        return lv[layer, self.index(emotion)]

    # -- files ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()},
                  str(directory / "bank.safetensors"))
        doc = {"format": FORMAT_VERSION, "labels": self.labels, "layer": self.layer, "model": self.model,
               "readout": self.readout, **self.meta}
        (directory / "bank.json").write_text(json.dumps(doc, indent=1))
        return directory

    @classmethod
    def load(cls, path: str | Path, model_fingerprint: dict | None = None) -> "ProbeBank":
        """Load ``bank/`` (or a run directory holding one); validate shapes and, given a
        fingerprint, refuse a bank made for another model."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        if (path / "bank").is_dir():
            path = path / "bank"
        meta_file, tensor_file = path / "bank.json", path / "bank.safetensors"
        if not meta_file.exists() or not tensor_file.exists():
            raise BankError(f"no probe bank in {path} (expected bank.json and bank.safetensors)")
        try:
            doc = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise BankError(f"{meta_file}: not valid JSON ({e})") from None
        for key in ("labels", "layer", "model"):
            if key not in doc:
                raise BankError(f"{meta_file}: missing field '{key}'")
        if doc.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise BankError(f"{meta_file}: format {doc['format']} is newer than this emoprobe understands")
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError) as e:
            raise BankError(f"{tensor_file}: unreadable safetensors file ({e})") from None
        missing = [k for k in REQUIRED_TENSORS if k not in tensors]
        if missing:
            raise BankError(f"{tensor_file}: missing tensors {missing}")
        n, d = len(doc["labels"]), int(doc["model"]["hidden_size"])
        expect = {"vectors": (n, d), "directions": (n, d), "dim_mean": (d,), "dim_scale": (d,),
                  "probe_coef": (n, d), "probe_intercept": (n,), "score_mean": (n,), "score_std": (n,)}
        for k, shape in expect.items():
            if tuple(tensors[k].shape) != shape:
                raise BankError(f"{tensor_file}: tensor '{k}' has shape {tuple(tensors[k].shape)}, expected {shape}")
        if not np.all(np.isfinite(tensors["score_std"])) or np.any(tensors["score_std"] <= 0):
            raise BankError(f"{tensor_file}: 'score_std' must be finite and positive")
        meta = {k: v for k, v in doc.items() if k not in ("format", "labels", "layer", "model", "readout")}
        bank = cls(doc["labels"], int(doc["layer"]), doc["model"], dict(tensors), doc.get("readout", "vectors"), meta)
        if model_fingerprint is not None:
            check_fingerprint(bank.model, model_fingerprint, what=f"probe bank {path}")
        return bank

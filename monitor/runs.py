"""Open a run directory: its bank, the model it was built for, and a reader on either
backend. The one place that loads a bank and its model together, so every command,
integration and benchmark checks the pairing the same way and loads each once."""
from __future__ import annotations

from pathlib import Path


def open_run(run: str | Path, model: str | None = None, device: str | None = None, dtype: str = "float32"):
    """``(bank, model, tokenizer)`` for a run directory. The bank is read (and validated)
    before any weights load, so a bad run fails fast; ``model`` defaults to the bank's
    own; a model that does not match the bank is refused in one line."""
    from probes.bank import ProbeBank
    from probes.models import check_fingerprint, fingerprint, load_model

    bank = ProbeBank.load(run)
    hf_model, tok = load_model(model or bank.model["name"], device=device, dtype=dtype)
    check_fingerprint(bank.model, fingerprint(hf_model, tok), what=f"probe bank {run}")
    return bank, hf_model, tok


def reader_spec(backend: str, device: str | None = None, dtype: str = "float32") -> str:
    """The ``spec`` the reader ``open_reader`` would build has, without building it (a scan's
    workers build theirs later; the scan records it up front)."""
    if backend == "onnx":
        from exporters.reader import MONITOR

        return f"onnx:{MONITOR}"
    from probes.capture import default_device
    from probes.models import resolve_dtype

    return f"torch:{resolve_dtype(dtype, device or default_device())}"


def open_reader(run: str | Path, backend: str = "torch", model: str | None = None, device: str | None = None,
                threads: int | None = None, batch_size: int = 16, dtype: str = "float32"):
    """A reader for a run: ``torch`` (the HF model on ``device``, default cuda when
    present) or ``onnx`` (``export/monitor.onnx`` on onnxruntime, no torch import).
    ``threads`` caps the backend's CPU threads (a share of the cores per worker);
    ``dtype`` is the torch model's (``"auto"``: bfloat16 where the device runs it natively)."""
    if backend == "onnx":
        if device not in (None, "cpu"):  # the export names its own model; --model changes nothing here
            raise ValueError("--backend onnx reads the exported graph with onnxruntime on the CPU: drop --device")
        from exporters import load

        return load(Path(run), threads=threads, batch_size=batch_size)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from probes.reader import TorchReader

    bank, hf_model, tok = open_run(run, model, device, dtype)
    return TorchReader(hf_model, tok, bank, batch_size=batch_size)

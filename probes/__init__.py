"""Probe banks: emotion vectors and linear probes for any HF causal LM.

Imports are lazy so that ``probes.bank`` and ``probes.reader.BaseReader`` stay usable
without torch (the onnxruntime reader needs neither torch nor transformers' models)."""
from importlib import import_module

_EXPORTS = {"ProbeBank": "bank", "BankError": "bank", "ModelError": "models", "fingerprint": "models",
            "load_model": "models", "TorchReader": "reader"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)

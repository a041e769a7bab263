"""Write ``RUN/export/``: head.onnx, monitor.onnx, monitor.int8.onnx, steering/*.gguf,
the tokenizer and card.json. Needs torch and the ``onnx`` package (the ``export`` extra);
reading the export back needs neither torch nor onnx (see ``reader.py``).

The int8 graph is chosen by measurement, not assumed (see ``int8.py``): each candidate
scheme is scored against the fp32 graph on a few texts and the fastest one that keeps
the rank fidelity wins; the scores are in card.json.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path


from calibration.run import RISK_FORMULA
from probes.bank import ProbeBank
from probes.capture import measure_residual_norms
from probes.models import check_fingerprint, fingerprint

from .int8 import MIN_SPEARMAN, MIN_TOP3, SCHEMES, SMOOTH_ALPHA, fidelity, good_enough, quantize, smoothed
from .reader import CARD, CARD_FORMAT, HEAD, MONITOR, MONITOR_INT8, OnnxReader, file_entry
from .steering import write_steering

OPSET = 17
# Texts for the export-time checks (fp32 vs torch, int8 vs fp32): varied emotion, short.
CHECK_TEXTS = (
    "I just took 8000 mg of Tylenol and the pain is gone, but my heart is racing.",
    "We finally closed the deal today and the whole team went out to celebrate!",
    "The meeting is scheduled for Tuesday at ten in the second floor conference room.",
    "My dog has been missing for four days and I keep checking the door every hour.",
    "Please stop calling me. I told you already that I am done with this.",
    "The function returns a list of integers sorted in ascending order.",
    "I failed the exam again. Everyone else passed and I do not know what to tell my parents.",
    "She held the baby for the first time and could not stop smiling.",
)


def _log(msg: str) -> None:
    print(f"[emoprobe] {msg}", file=sys.stderr, flush=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emoprobe")
    except PackageNotFoundError:
        return "0+unknown"


def graph_meta(model, tokenizer, bank: ProbeBank, graph: str, outputs: list[str]) -> dict:
    """What every ONNX file and the card say about where they came from."""
    from probes.capture import max_context

    return {"emoprobe_format": CARD_FORMAT, "graph": graph, "labels": list(bank.labels), "layer": int(bank.layer),
            "model": fingerprint(model, tokenizer), "readout": bank.readout, "outputs": outputs, "opset": OPSET,
            "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "max_len": int(max_context(model, tokenizer)),
            "calibration": bank.meta.get("calibration"), "emoprobe_version": _version()}


def _save(proto, path: Path, meta: dict) -> None:
    import onnx

    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=json.dumps(v))
    proto.doc_string = f"emoprobe {meta['graph']} graph for {meta['model']['name']} (layer {meta['layer']})"
    onnx.save_model(proto, str(path))


def _export(module, args, names_in, names_out, axes):
    """torch.onnx's TorchScript exporter: ~5x faster than ``dynamo=True`` on these graphs
    (whose onnxscript rewriter dominates) with the same onnxruntime speed and parity."""
    import io
    import warnings

    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buffer, dynamo=False, opset_version=OPSET, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes, do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def export_head(bank: ProbeBank, path: Path, meta: dict) -> Path:
    """head.onnx: hidden [batch, tokens, D] -> scores [batch, tokens, n] (, risk [batch, tokens])."""
    import torch

    from .graphs import Head

    head = Head(bank)
    outputs = ["scores", "risk"] if head.risk else ["scores"]
    hidden = torch.zeros(2, 3, int(bank.model["hidden_size"]))
    axes = {"hidden": {0: "batch", 1: "tokens"}}
    _save(_export(head, (hidden,), ["hidden"], outputs, axes), path, {**meta, "graph": "head", "outputs": outputs})
    return path


def export_monitor(model, bank: ProbeBank, path: Path, meta: dict) -> Path:
    """monitor.onnx: input_ids, attention_mask [batch, tokens] -> scores (, risk)."""
    import torch

    from .graphs import Monitor

    module = Monitor(model, bank)
    outputs = ["scores", "risk"] if module.head.risk else ["scores"]
    # Example batch: 2 rows, 8 tokens, one left padded (no size 0/1 that export would specialise on).
    ids = torch.full((2, 8), 1, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    axes = {n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask")}
    _save(_export(module, (ids, mask), ["input_ids", "attention_mask"], outputs, axes), path,
          {**meta, "graph": "monitor", "outputs": outputs})
    return path


def _int8(model, tokenizer, bank, out: Path, meta: dict, seqs, fp32) -> dict:
    """Write monitor.int8.onnx with the fastest scheme that is ``good_enough`` against fp32
    on the check texts (else the most faithful one); return the measurements."""
    from calibration import neutral_set

    source, alpha = out / MONITOR, None
    smooth = smoothed(model, tokenizer, bank.layer, neutral_set().prompts[:32])
    if smooth is not None:  # statistics from neutral prompts; fidelity is measured on CHECK_TEXTS
        source, alpha = out / "smoothed.tmp.onnx", SMOOTH_ALPHA
        export_monitor(smooth, bank, source, meta)
        del smooth
    candidates, protos = [], []
    for name, skip_down in SCHEMES:
        name = name if alpha else name.replace("smooth-", "")
        proto, kept = quantize(source, out / MONITOR_INT8, skip_down)
        _save(proto, out / MONITOR_INT8, {**meta, "quantization": name})
        f = fidelity(fp32, OnnxReader(out / MONITOR_INT8, tokenizer).score_ids(seqs))
        candidates.append({"scheme": name, "fp32_matmuls": kept, **f})
        protos.append(proto)
        if good_enough(f):
            break
    best = max(range(len(candidates)), key=lambda i: candidates[i]["spearman_mean"])
    if not good_enough(candidates[-1]):
        _save(protos[best], out / MONITOR_INT8, {**meta, "quantization": candidates[best]["scheme"]})
        _log(f"warning: no int8 scheme keeps Spearman >= {MIN_SPEARMAN} and the same top-3 on >= {MIN_TOP3:.0%} "
             f"of tokens against fp32 (best: {candidates[best]}); prefer monitor.onnx")
    else:
        best = len(candidates) - 1
    if source != out / MONITOR:
        source.unlink()
    return {"chosen": candidates[best]["scheme"], "smoothquant_alpha": alpha,
            "min_spearman": MIN_SPEARMAN, "min_top3_agreement": MIN_TOP3,
            "quantization": "onnxruntime dynamic int8, per-channel weights; the probe head stays fp32",
            "candidates": candidates}


def export_run(run_dir, model, tokenizer, bank: ProbeBank, int8: bool = True, progress: bool = True, *,
               steering: bool = True, residual_norms=None) -> Path:
    """Export ``bank`` (and the model up to its read layer) to ``run_dir/export``; returns it.

    Written to a temporary directory first, so a failed export never leaves a
    half-written ``export/`` that ``load`` would accept."""
    from tqdm import tqdm

    from probes.reader import TorchReader

    from .graphs import has_risk

    check_fingerprint(bank.model, fingerprint(model, tokenizer), what="probe bank")
    weights = next(model.parameters())
    if weights.device.type != "cpu" or not weights.is_floating_point() or weights.element_size() != 4:
        model = copy.deepcopy(model).float().cpu()  # the graphs are traced, run and checked on the CPU in fp32
    run_dir = Path(run_dir)
    final, out = run_dir / "export", run_dir / "export.partial"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    risk = has_risk(bank)
    meta = graph_meta(model, tokenizer, bank, "monitor", ["scores", "risk"] if risk else ["scores"])
    bar = tqdm(total=3 + int8 + steering, desc="export", unit="step", disable=not progress)
    checks: dict = {"texts": len(CHECK_TEXTS)}
    bar.set_postfix_str(HEAD)
    export_head(bank, out / HEAD, meta)
    bar.update(), bar.set_postfix_str(MONITOR)
    export_monitor(model, bank, out / MONITOR, meta)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    bar.update(), bar.set_postfix_str("torch parity")
    seqs = [tokenizer(t)["input_ids"] for t in CHECK_TEXTS]
    fp32 = OnnxReader(out / MONITOR, tokenizer).score_ids(seqs)
    checks["fp32_vs_torch"] = fidelity(TorchReader(model, tokenizer, bank).score_ids(seqs), fp32)
    bar.update()
    if int8:
        bar.set_postfix_str(MONITOR_INT8)
        checks["int8_vs_fp32"] = _int8(model, tokenizer, bank, out, meta, seqs, fp32)
        bar.update()
    card = {**{k: v for k, v in meta.items() if k != "graph"}, "files": {}, "checks": checks,
            "int8_scheme": checks["int8_vs_fp32"]["chosen"] if int8 else None,
            "inputs": {"head": "hidden float32 [batch, tokens, hidden]",
                       "monitor": "input_ids, attention_mask int64 [batch, tokens]; any padding side"},
            "units": "calibrated z-scores" if bank.calibrated else "raw scores (bank not calibrated)"}
    if "alert_threshold" in bank.tensors:
        card["alert_threshold"] = [round(float(x), 5) for x in bank.tensors["alert_threshold"]]
    if risk:
        card["risk_formula"] = RISK_FORMULA
    if steering:
        bar.set_postfix_str("steering")
        norms = residual_norms if residual_norms is not None else bank.tensors.get("residual_norm")
        norms = measure_residual_norms(model, tokenizer) if norms is None else norms
        card["steering"] = write_steering(out / "steering", bank, norms)
        bar.update()
    bar.close()
    for f in (HEAD, MONITOR, MONITOR_INT8):
        if (out / f).exists():
            card["files"][f] = file_entry(out / f)
    (out / CARD).write_text(json.dumps(card, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return final

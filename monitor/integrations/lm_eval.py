"""lm-evaluation-harness integration (``pip install emoprobe[lm-eval]``): model ``emoprobe``.

It is the harness's own HF model (``HFLM``, so results are the ``hf`` model's) with a
side-car: after each batch of requests it reads every request's text (context, then
continuation or generated text) with the probe bank and appends one JSONL line per
request to ``readout=`` (default ``emoprobe_readout.jsonl``): the task, doc and request,
mean z over the continuation's tokens, each emotion's peak there, the flags of the
watch rules (as ``emoprobe scan`` writes them) and the reading at the context's last
token, where the model's answer opens.

lm-eval has no plugin entry point for models, so the module must be imported before
the harness looks the name up; ``python -m monitor.integrations.lm_eval`` is the
``lm-eval`` command with the model registered::

    python -m monitor.integrations.lm_eval run --model emoprobe \\
        --model_args run=runs/default,readout=readout.jsonl --tasks TASK
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import DEFAULT_RUN, IntegrationError, Session, load_reader

DEFAULT_READOUT = "emoprobe_readout.jsonl"


def _names(value) -> list[str] | None:
    if value is None:
        return None
    return [v for v in str(value).split("|") if v.strip()] if isinstance(value, str) else list(value)


@register_model("emoprobe")
class EmoprobeLM(HFLM):
    """``--model emoprobe --model_args run=DIR[,pretrained=MODEL][,readout=FILE][,watch=a|b][,alerts=r1|r2]``:
    the model loads once per process from the run directory (``pretrained`` defaults to
    the bank's model); ``|`` separates several watch emotions or alert rules."""

    def __init__(self, run: str = DEFAULT_RUN, pretrained: str | None = None, readout: str = DEFAULT_READOUT,
                 watch: str | None = None, alerts: str | None = None, batch_size: int | str = 1, **kwargs):
        if not isinstance(pretrained, (str, type(None))):
            raise IntegrationError("emoprobe: pretrained= is a model name or directory (the model loads from the run)")
        reader = load_reader(run, pretrained)
        self.session = Session(reader, _names(watch), _names(alerts) or [])
        kwargs.pop("device", None)  # the loaded model stays where it is
        super().__init__(pretrained=reader.model, tokenizer=reader.tokenizer, batch_size=batch_size, **kwargs)
        self.readout_path = Path(readout)
        self.readout_path.parent.mkdir(parents=True, exist_ok=True)
        self.readout_path.write_text("")  # one file per run

    # -- the harness's request types, each followed by its readout ---------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._record(requests, [r.args[:2] for r in requests], out)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._record(requests, [("", r.args[0]) for r in requests], out)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._record(requests, [(r.args[0], o) for r, o in zip(requests, out)], out)
        return out

    # -- the side-car ------------------------------------------------------------------
    def _record(self, requests, pairs, results) -> None:
        """Read each (context, continuation) once, all in one batched call, and append a line per request."""

        if self.rank != 0 or not requests:
            return
        items = [self._encode(ctx, cont) for ctx, cont in pairs]
        keep = [it for it in items if it.ids]
        scores = dict(zip(map(id, keep), self.session.reader.score_ids([it.ids for it in keep])))
        with open(self.readout_path, "a", encoding="utf-8") as f:
            for r, it, res in zip(requests, items, results):
                s = scores.get(id(it), np.zeros((0, len(self.session.labels)), np.float32))
                f.write(json.dumps(self._line(r, it, s, res), ensure_ascii=False) + "\n")
            f.flush()

    def _encode(self, context: str, continuation: str):
        """The request's text as two messages, tokenized with character offsets (no
        special tokens: the readout is of the text itself)."""
        from monitor.logscan.readers import Conversation
        from monitor.logscan.scan import Encoded

        tok = self.session.reader.tokenizer
        ids, offsets, members, text = [], [], [], ""
        for part in (context, continuation):
            enc = tok(part, add_special_tokens=False, return_offsets_mapping=True)
            members.append(np.arange(len(ids), len(ids) + len(enc["input_ids"])))
            offsets += [(a + len(text), b + len(text)) for a, b in enc["offset_mapping"]]
            ids += list(enc["input_ids"])
            text += part
        conv = Conversation("request", [{"role": "user", "content": context or " ", "id": None},
                                        {"role": "assistant", "content": continuation or " ", "id": None}], "lm-eval")
        return Encoded(conv, text, ids, np.asarray(offsets, np.int64).reshape(-1, 2), members)

    def _line(self, request, enc, scores: np.ndarray, result) -> dict:
        from monitor.logscan.scan import conversation_lines

        labels = self.session.labels
        ctx, cont = conversation_lines(enc, scores, labels, self.session.rules, detail=False)
        opens = scores[enc.members[0][-1]] if len(enc.members[0]) else None
        return {"task": request.task_name, "doc_id": request.doc_id, "idx": request.idx,
                "request_type": request.request_type, "result": _plain(result),
                "context_tokens": ctx["n_tokens"], "continuation_tokens": cont["n_tokens"],
                "emotions": cont["scores"], "peak": {e: v[0] for e, v in (cont["peak"] or {}).items()},
                "flags": cont["flags"], "risk": cont["risk"],
                "reply_opens": None if opens is None else {e: round(float(v), 3) for e, v in zip(labels, opens)}}


def _plain(result):
    """A request's result as JSON: loglikelihood (float, bool) pairs, floats or text."""
    if isinstance(result, (tuple, list)):
        return [_plain(x) for x in result]
    if isinstance(result, (bool, str)) or result is None:
        return result
    return float(result)


def main(argv: list[str] | None = None) -> None:
    """The ``lm-eval`` command line, with the ``emoprobe`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()

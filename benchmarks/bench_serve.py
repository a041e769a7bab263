"""What does serving cost? Tokens/s of the same greedy generations (a) in process:
``model.generate`` with the EmotionMonitor attached, as the server calls it, (b) through
``emoprobe serve`` with the official openai client, one client at a time (plain and
streamed), and (c) four concurrent clients (equal settings, so the server batches them)
against the same 4-row generate() calls in process. Interleaved repeats; the ratios are
medians over repeats of (server / in process) from the same repeat. Writes JSON.

The server runs in this process (uvicorn in a thread, as the tests do), so client,
server and model share the machine's cores in every figure.

    python benchmarks/bench_serve.py                      # default model, runs/default
    python benchmarks/bench_serve.py --tokens 32 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from bench_monitor import PROMPTS
from monitor.runs import open_run
from monitor.serve import Engine, create_app, serving
from probes.tokens import encode_chat

CLIENTS = 4


def chat(text):
    return [{"role": "user", "content": text}]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def in_process(engine: Engine, rows: list[list[str]], max_tokens: int) -> tuple[int, float]:
    """(tokens, seconds) of greedy generate() calls with the monitor attached, one call per
    row group (left-padded, as the server pads a batch)."""
    model, tok, pad = engine.model, engine.tok, engine.pad
    tokens, t0 = 0, time.perf_counter()
    for group in rows:
        ids = [encode_chat(tok, chat(p), generation_prompt=True)[1] for p in group]
        P = max(map(len, ids))
        x = torch.tensor([[pad] * (P - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (P - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad(), engine.monitor.attach() as trace:
            model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=pad, eos_token_id=engine.eos or None, temperature=None, top_p=None, top_k=None)
        tokens += sum(trace.lengths)
    return tokens, time.perf_counter() - t0


def through_server(client, name: str, prompts: list[str], max_tokens: int, stream: bool) -> tuple[int, float]:
    tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        if stream:
            chunks = list(client.chat.completions.create(model=name, messages=chat(p), max_tokens=max_tokens,
                                                         temperature=0, stream=True))
            tokens += sum(1 for c in chunks if c.choices and "token" in (c.choices[0].model_extra.get("emotions") or {}))
        else:
            out = client.chat.completions.create(model=name, messages=chat(p), max_tokens=max_tokens, temperature=0)
            tokens += out.usage.completion_tokens
    return tokens, time.perf_counter() - t0


def concurrent(clients, name: str, max_tokens: int) -> tuple[int, float]:
    """CLIENTS threads, each sending every prompt in turn, client i starting at prompt i."""
    counts = [0] * len(clients)

    def work(i):
        order = PROMPTS[i:] + PROMPTS[:i]
        counts[i] = through_server(clients[i], name, order, max_tokens, stream=False)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clients))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def main() -> None:
    import openai

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per reply")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()

    load_before = os.getloadavg()
    bank, model, tok = open_run(args.run, device="cpu")
    engine = Engine(model, tok, bank, max_tokens=max(args.tokens, 64))
    groups4 = [[PROMPTS[(i + j) % len(PROMPTS)] for i in range(CLIENTS)] for j in range(len(PROMPTS))]
    runs: dict[str, list] = {k: [] for k in ("in_process", "server", "server_stream", "in_process_batch4", "server_4_clients")}
    with serving(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        clients = [openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) for _ in range(CLIENTS)]
        through_server(client, engine.name, PROMPTS[:1], 4, stream=False)  # warm up both paths
        in_process(engine, [PROMPTS[:1]], 4)
        for r in range(args.repeats):
            order = [("in_process", lambda: in_process(engine, [[p] for p in PROMPTS], args.tokens)),
                     ("server", lambda: through_server(client, engine.name, PROMPTS, args.tokens, False)),
                     ("server_stream", lambda: through_server(client, engine.name, PROMPTS, args.tokens, True)),
                     ("in_process_batch4", lambda: in_process(engine, groups4, args.tokens)),
                     ("server_4_clients", lambda: concurrent(clients, engine.name, args.tokens))]
            for key, fn in (order if r % 2 == 0 else order[::-1]):
                n, s = fn()
                runs[key].append({"tokens": n, "seconds": round(s, 3), "tokens_per_s": round(n / s, 2)})
                print(f"repeat {r}: {key:<18} {n:>5} tokens {s:7.2f} s {n / s:7.2f} tok/s", flush=True)
        m = engine.metrics
        readout = m.registry.get_sample_value("emoprobe_readout_seconds_per_token_sum") / \
            m.registry.get_sample_value("emoprobe_readout_seconds_per_token_count")
        batch = m.registry.get_sample_value("emoprobe_batch_size_sum") / m.registry.get_sample_value("emoprobe_batch_size_count")

    def ratio(a, b):
        return round(statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])), 3)

    doc = {"benchmark": "emoprobe serve throughput vs the same generate() in process",
           "model": bank.model["name"], "bank": args.run, "labels": len(bank.labels), "read_layer": bank.layer,
           "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                       "note": "shared with other jobs while it ran; server, client and model in one process"},
           "max_tokens": args.tokens, "prompts": len(PROMPTS), "clients": CLIENTS, "repeats": args.repeats,
           "greedy": True,
           "ratios": {"server_vs_in_process": ratio("server", "in_process"),
                      "server_stream_vs_in_process": ratio("server_stream", "in_process"),
                      "server_4_clients_vs_in_process_batch4": ratio("server_4_clients", "in_process_batch4"),
                      "server_4_clients_vs_in_process_single": ratio("server_4_clients", "in_process")},
           "server_mean_batch_size": round(batch, 2),
           "server_readout_us_per_token": round(readout * 1e6, 1),
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["ratios"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

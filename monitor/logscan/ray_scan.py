"""Scan agent logs on a Ray cluster (``emoprobe scan --engine ray``), with the local scan's
exact output and a resume of its own.

The driver streams the logs with ``read_logs`` (so malformed input is reported with its
file and line, as locally), drops duplicate ids as the local scan does, and cuts the
conversations into fixed shards by input order (shard k = conversations k*S..(k+1)*S-1).
The shards not yet finished become one Ray Dataset scored by ``map_batches`` with a pool
of actors, each of which loads the model and bank once and scores a batch with the local
scan's own ``scan_batch``. Ray Data has no resume, so the driver writes each shard when
its last conversation comes back (temp file, fsync, rename) and then records it in
``manifest.json`` (rewritten the same way): a driver killed at any point loses at most the
shards in flight, and a restart redoes exactly those. A worker that dies mid-batch is
restarted and its batch retried by Ray (``max_restarts``/``max_task_retries``).

Output directory: ``shards/NNNNN.jsonl``, ``manifest.json``, and once every shard is done
``scan.jsonl`` (shards in input order) and ``scan.summary.json``: the files a local scan
writes, byte for byte in format, so ``--html`` and ``report.py`` read them unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from .readers import Conversation, Skipped, id_hash, read_logs
from .scan import make_rules, scan_batch, scan_settings, summarize, summary_path

MISSING = "the Ray engine needs Ray: pip install 'emoprobe[ray]'"
SHARD_SIZE = 256  # conversations per shard: the unit of resume
BATCH_SIZE = 16  # conversations per actor call


def _atomic_write(path: Path, chunks) -> None:
    """Write ``chunks`` (str) to a temp file beside ``path``, fsync, rename over it: a
    reader (or a restart) sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def read_shards(paths, fmt, shard_size: int, skipped: list[dict]) -> list[list[Conversation]]:
    """The conversations of the logs in input order, cut into shards of ``shard_size``;
    malformed input and duplicate ids go to ``skipped`` exactly as in the local scan."""
    shards: list[list[Conversation]] = [[]]
    seen: set[int] = set()  # id hashes, as the local scan keeps
    for item in read_logs(paths, fmt):
        if isinstance(item, Skipped):
            skipped.append({"source": item.source, "reason": item.reason})
            print(f"emoprobe scan: skipped {item.source}: {item.reason}", file=sys.stderr)
        elif (key := id_hash(item.id)) in seen:
            skipped.append({"source": item.source, "reason": f"duplicate conversation id {item.id}"})
        else:
            seen.add(key)
            if len(shards[-1]) == shard_size:
                shards.append([])
            shards[-1].append(item)
    return [s for s in shards if s]


class Scorer:
    """One Ray actor: the model and bank loaded once, threads set to the actor's CPU share,
    each batch scored by the local scan's ``scan_batch``. ``faults`` is for the tests: a
    ``fail_once`` marker file (whoever removes it dies mid-batch) and a ``delay`` per batch."""

    def __init__(self, run, backend, model, device, threads, rules, detail, scan_kwargs, reader_kwargs=None, faults=None):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        from monitor.runs import open_reader

        self.reader = open_reader(run, backend, model, device, threads, **(reader_kwargs or {}))
        self.rules, self.detail, self.kw, self.faults = rules, detail, scan_kwargs or {}, faults or {}
        self.loaded_mb = _peak_rss_mb()  # the process with torch, the model and the bank

    def __call__(self, batch: dict) -> dict:
        convs = [Conversation(**json.loads(c)) for c in batch["conv"]]
        time.sleep(self.faults.get("delay", 0))
        t0 = time.perf_counter()
        results = scan_batch(self.reader, convs, self.rules, self.detail, **self.kw)
        busy = (time.perf_counter() - t0) / max(len(convs), 1)  # the actor's own time, for per-actor throughput
        if self.faults.get("fail_once"):
            try:
                os.remove(self.faults["fail_once"])  # atomic: exactly one actor call in the cluster gets here
                os._exit(1)  # the batch is scored, its result lost
            except FileNotFoundError:
                pass
        return {"shard": batch["shard"], "pos": batch["pos"],
                "lines": [("".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines)) for _, lines, _ in results],
                "tokens": [n for _, _, n in results], "seconds": [busy] * len(results),
                "rss_loaded_mb": [self.loaded_mb] * len(results), "rss_peak_mb": [_peak_rss_mb()] * len(results)}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpus_per_actor(ray, actors: int) -> int:
    """An even share of the cluster's CPUs, no more than one node has."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources().get("CPU", 1)
    return max(1, int(min(max(nodes, default=1), total // max(actors, 1))))


def scan_on_ray(paths: Sequence[str | Path], run: str | Path, out_dir: str | Path, *, backend: str = "torch",
                model: str | None = None, device: str | None = None, rules=None, fmt: str | None = None,
                actors: int = 1, cpus_per_actor: int | None = None, num_gpus: float = 0,
                shard_size: int = SHARD_SIZE, batch_size: int = BATCH_SIZE, address: str | None = None,
                overwrite: bool = False, detail: bool = True, progress: bool = True, max_retries: int = 3,
                scan_kwargs: dict | None = None, reader_kwargs: dict | None = None, _faults: dict | None = None) -> dict:
    """Scan log files on Ray into ``out_dir`` and return the summary (the local scan's, with
    ``this_run.engine = "ray"``). Each of ``actors`` actors opens ``run`` itself
    (``open_reader(run, backend, model, device, threads)``), so the run directory and the
    model must be readable at the same path on every node. ``scan_kwargs`` go to
    ``scan_batch`` unchanged (and into the settings, as the local scan's), ``reader_kwargs``
    to ``open_reader``. A dead actor is restarted and its batch retried up to
    ``max_retries`` times. Uses the connected Ray if there is one, else ``ray.init(address)``."""
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(MISSING, name="ray") from e
    from probes.bank import ProbeBank

    if actors < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError("actors, shard size and batch size must be at least 1")
    from monitor.runs import reader_spec
    from probes.capture import default_device
    from probes.models import resolve_dtype

    bank = ProbeBank.load(run)
    rules = list(make_rules(bank) if rules is None else rules)
    reader_kwargs = dict(reader_kwargs or {})
    if backend == "torch":  # "auto" resolved once, here, as a local scan would: every actor reads in one dtype
        reader_kwargs["dtype"] = resolve_dtype(reader_kwargs.get("dtype", "float32"), device or default_device())
    spec = reader_spec(backend, device, reader_kwargs.get("dtype", "float32"))
    settings = scan_settings(bank, rules, detail, **(scan_kwargs or {}), reader=spec)  # what the local scan records
    key = {"settings": settings, "scan_kwargs": scan_kwargs or {}, "reader_kwargs": reader_kwargs or {},
           "shard_size": shard_size, "format": fmt}
    out_dir = Path(out_dir)
    shard_dir, mpath, out = out_dir / "shards", out_dir / "manifest.json", out_dir / "scan.jsonl"
    if overwrite:
        shutil.rmtree(shard_dir, ignore_errors=True)
        for p in (mpath, out, summary_path(out)):
            p.unlink(missing_ok=True)
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {"key": key, "shards": {}}
    if manifest["key"] != key:
        raise ValueError(f"{out_dir} was written with other settings ({manifest['key']}); use another --out or --overwrite")
    shard_dir.mkdir(parents=True, exist_ok=True)
    for tmp in [*shard_dir.glob(".*.tmp"), *out_dir.glob(".*.tmp")]:  # left by a killed driver
        tmp.unlink(missing_ok=True)

    skipped: list[dict] = []
    shards = read_shards(paths, fmt, shard_size, skipped)
    digests = [_digest([c.id for c in convs]) for convs in shards]
    todo, already = [], 0
    for k, convs in enumerate(shards):
        got = manifest["shards"].get(str(k))
        if got and (shard_dir / f"{k:05d}.jsonl").exists():
            if got["ids"] != digests[k]:
                raise ValueError(f"the logs changed since {out_dir} was started (shard {k} holds other conversations); "
                                 "use another --out or --overwrite")
            already += len(convs)
        else:
            todo.append(k)

    summary_path(out).write_text(json.dumps({"status": "running", "settings": settings}, indent=1))

    def record(k: int, texts: list[str], tokens: int) -> None:
        _atomic_write(shard_dir / f"{k:05d}.jsonl", texts)
        manifest["shards"][str(k)] = {"conversations": len(texts), "lines": sum(t.count("\n") for t in texts),
                                      "tokens": tokens, "ids": digests[k]}
        _atomic_write(mpath, [json.dumps(manifest, indent=1)])

    t0, n_tok, n_conv, busy, rss = time.perf_counter(), 0, 0, 0.0, [0.0, 0.0]
    started = False
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False)
            started = address is None
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc="scan (ray)", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        waiting: dict[int, dict[int, tuple[str, int]]] = {k: {} for k in todo}
        try:  # from here on, a cluster this scan started is shut down whatever happens
            ray.data.DataContext.get_current().enable_progress_bars = False
            cpus = cpus_per_actor or _cpus_per_actor(ray, actors)
            rows = [{"shard": k, "pos": i, "conv": json.dumps(vars(c), ensure_ascii=False, default=str)}
                    for k in todo for i, c in enumerate(shards[k])]
            shards = [len(c) for c in shards]  # the driver keeps counts; the texts are in the object store
            # Ray Data retries forever by default; a batch that kills its actor every time should end the scan.
            with warnings.catch_warnings():  # Ray 2.60 has no named parameter for these yet
                warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
                ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 200))).map_batches(
                    Scorer, batch_size=batch_size, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=num_gpus or None,
                    fn_constructor_kwargs=dict(run=str(run), backend=backend, model=model, device=device, threads=cpus,
                                               rules=rules, detail=detail, scan_kwargs=scan_kwargs,
                                               reader_kwargs=reader_kwargs, faults=_faults),
                    max_restarts=max_retries, max_task_retries=max_retries)
            del rows
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                busy += float(b["seconds"].sum())
                rss = [max(rss[0], float(b["rss_loaded_mb"].max())), max(rss[1], float(b["rss_peak_mb"].max()))]
                for k, i, text, n in zip(b["shard"], b["pos"], b["lines"], b["tokens"]):
                    k, i = int(k), int(i)
                    if k not in waiting or i in waiting[k]:  # a retried block sent it again: counted once
                        continue
                    waiting[k][i] = (str(text), int(n))
                    n_tok, n_conv = n_tok + int(n), n_conv + 1
                    bar.update(int(n))
                    if len(waiting[k]) == shards[k]:
                        done = waiting.pop(k)
                        record(k, [done[j][0] for j in range(shards[k])], sum(v[1] for v in done.values()))
        finally:
            bar.close()
            if started:
                ray.shutdown()
        if waiting:
            raise RuntimeError(f"Ray returned no result for shards {sorted(waiting)}; run the scan again to resume")
    seconds = time.perf_counter() - t0

    _atomic_write(out, ((shard_dir / f"{k:05d}.jsonl").read_text(encoding="utf-8") for k in range(len(shards))))
    summary = summarize(out, skipped, settings)
    summary["this_run"] = {"conversations": n_conv, "tokens": n_tok, "seconds": round(seconds, 2),
                           "tokens_per_s": round(n_tok / seconds, 1) if seconds > 0 else None,
                           "already_done": already, "workers": actors, "engine": "ray", "shards": len(shards),
                           "shards_already_done": len(shards) - len(todo), "actor_seconds": round(busy, 2),
                           "tokens_per_actor_s": round(n_tok / busy, 1) if busy > 0 else None,
                           "actor_rss_mb": {"loaded": round(rss[0]), "peak": round(rss[1])}}
    summary_path(out).write_text(json.dumps(summary, indent=1))
    return summary

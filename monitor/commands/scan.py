"""emoprobe scan: read agent logs, flag risky emotional states, write JSONL + summary + HTML.

Exit code: 0 when every input was read, 1 when a line, member or file was skipped
(each is listed with its location), 2 on an error."""
from __future__ import annotations

import functools
import sys
from pathlib import Path


def register(sub) -> None:
    from monitor.logscan.readers import FORMATS
    from monitor.logscan.scan import DEFAULT_WATCH, MAX_MESSAGE_TOKENS, SMOOTH

    p = sub.add_parser("scan", help="scan agent logs for risky emotional states")
    p.add_argument("logs", nargs="+", help="log files or directories (JSONL, JSON, .eval, text)")
    p.add_argument("--run", required=True, help="run directory with bank/ (and export/ for --backend onnx)")
    p.add_argument("--out", required=True, help="output JSONL, one line per message; resumed if it exists (--engine ray: a directory)")
    p.add_argument("--html", help="also write a self-contained HTML report here")
    p.add_argument("--format", choices=FORMATS, help="force a log format (default: detected per file)")
    p.add_argument("--watch",
                   help="comma-separated emotions watched at calibrated thresholds; 'calm<' watches the low side "
                        f"(default: {','.join(DEFAULT_WATCH)}; '' for none)")
    p.add_argument("--alert", action="append", default=[], metavar="RULE",
                   help="extra alert rule as in 'emoprobe watch', used as written, e.g. 'desperate>3', "
                        "'calm<-2 for 3', 'desperate>2 rolling 5 & calm<-1' (repeatable)")
    p.add_argument("--smooth", type=int, default=SMOOTH, help="watched emotions are read as a rolling mean over this many tokens")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, each with its own model")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="torch weights (default auto: bfloat16 where the device runs it natively, a GPU or a CPU "
                        "with AMX/AVX512-BF16, ~2.6x faster on the default model with per-token Spearman 0.9997 "
                        "against float32; else float32)")
    p.add_argument("--max-message-tokens", type=int, default=MAX_MESSAGE_TOKENS,
                   help="read at most this many tokens of each message (a tool dumping a log); the cut is noted in "
                        f"the message's line (default {MAX_MESSAGE_TOKENS}; 0: no cap)")
    p.add_argument("--top", type=int, default=50, help="conversations shown in detail in the HTML report")
    p.add_argument("--no-detail", dest="detail", action="store_false",
                   help="leave out the per-token detail (token texts, series, top emotions) the HTML heat map needs; "
                        "lines get much smaller")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray engine (pip install 'emoprobe[ray]'; --out is then a directory, resumed by shard)")
    ray.add_argument("--engine", choices=["local", "ray"], default="local", help="where to scan (default: this process)")
    ray.add_argument("--address", help="Ray cluster address (default: the running cluster, else a local one)")
    ray.add_argument("--actors", type=int, default=1, help="Ray actors, each with its own model")
    ray.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    ray.add_argument("--shard-size", type=int, default=256, help="conversations per shard, the unit of resume")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from monitor.runs import open_reader, reader_spec
    from monitor.logscan.scan import format_summary, make_rules, scan, summary_path
    from probes.bank import ProbeBank

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    missing = [p for p in args.logs if not Path(p).exists()]
    if missing and len(missing) == len(args.logs):
        raise FileNotFoundError(f"no such log file: {missing[0]}")
    bank = ProbeBank.load(args.run)
    watch = None if args.watch is None else args.watch.split(",")
    rules = make_rules(bank, watch, args.alert, args.smooth)
    if args.engine == "ray":
        try:
            from monitor.logscan.ray_scan import MISSING, scan_on_ray
            import ray  # noqa: F401
        except ModuleNotFoundError as e:
            raise ValueError(MISSING) from e
        summary = scan_on_ray(args.logs, args.run, args.out, backend=args.backend, model=args.model, device=args.device,
                              rules=rules, fmt=args.format, actors=args.actors, num_gpus=args.num_gpus,
                              shard_size=args.shard_size, address=args.address, overwrite=args.overwrite,
                              detail=args.detail, progress=not args.quiet,
                              scan_kwargs={"max_message_tokens": args.max_message_tokens or None},
                              reader_kwargs={"dtype": args.dtype})
        args.out = str(Path(args.out) / "scan.jsonl")
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None
        factory = functools.partial(open_reader, args.run, args.backend, args.model, args.device, threads,
                                    dtype=args.dtype)
        reader = factory if args.workers > 1 else factory()
        summary = scan(args.logs, args.out, reader, bank=bank, rules=rules, fmt=args.format,
                       workers=args.workers, progress=not args.quiet, overwrite=args.overwrite, detail=args.detail,
                       max_message_tokens=args.max_message_tokens or None,
                       reader_spec=reader_spec(args.backend, args.device, args.dtype))
    print(format_summary(summary))
    print(f"\nwrote {args.out} and {summary_path(Path(args.out))}")
    if args.html:
        from monitor.logscan.report import write_report

        print(f"wrote {write_report(args.out, args.html, summary, args.top)}")
    return 1 if summary["skipped"] else 0


if __name__ == "__main__":
    from monitor.cli import main

    sys.exit(main(["scan", *sys.argv[1:]]))

"""emoprobe serve: an OpenAI-compatible chat endpoint that returns the model's emotions
with every reply (monitor/serve.py; the schema is in the README, "Serving").

Weights are only ever read from disk (the offline models, a local directory or the local
Hugging Face cache); the hub is switched off before anything loads."""
from __future__ import annotations

import ipaddress
import os
import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible chat endpoint that returns the model's emotions with every reply")
    p.add_argument("--run", required=True, help="run directory with bank/")
    p.add_argument("--model", help="model name or directory (default: the bank's model)")
    p.add_argument("--device", help="torch device for the model (default: cuda when present, else cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--alert", action="append", default=[], metavar="RULE",
                   help="alert rule reported with each reply (repeatable), e.g. 'desperate>3', 'calm<-2 for 3'")
    p.add_argument("--stop-on", action="append", default=[], metavar="RULE",
                   help="rule that ends a reply when it fires (finish_reason 'content_filter'; repeatable)")
    p.add_argument("--log-dir", help="append each conversation with its readout to DIR/chat-YYYYMMDD.jsonl "
                                     "(OpenAI format; `emoprobe scan DIR` reads it)")
    p.add_argument("--api-key", default=os.environ.get("EMOPROBE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $EMOPROBE_API_KEY, else none)")
    p.add_argument("--name", help="model id clients pass as 'model' (default: the bank's model name)")
    p.add_argument("--max-tokens", type=int, default=512, help="default and largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=8, help="most requests (with equal settings) in one generate() call")
    p.set_defaults(func=run)


def run(args) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # never fetch weights, whatever the model name says
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"emoprobe serve needs the 'serve' extra ({e.name} is missing): "
                         "pip install 'emoprobe[serve]'") from None
    from monitor.runs import open_run
    from monitor.rules import parse_rule
    from monitor.serve import Engine, create_app
    from probes.bank import ProbeBank

    labels = ProbeBank.load(args.run).labels  # rules are checked before any weights load
    alerts = [parse_rule(r, labels) for r in args.alert]
    stop_on = [parse_rule(r, labels) for r in args.stop_on]
    if not args.api_key and not _loopback(args.host):
        print(f"emoprobe serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    bank, model, tok = open_run(args.run, args.model, args.device)
    engine = Engine(model, tok, bank, name=args.name, alerts=alerts, stop_on=stop_on, log_dir=args.log_dir,
                    max_tokens=args.max_tokens, max_batch=args.max_batch)
    print(f"[emoprobe] serving '{engine.name}' (read layer {engine.monitor.layer}, {len(engine.labels)} emotions, "
          f"unit {engine.unit}) at http://{args.host}:{args.port}/v1"
          + (f"; alerts {[str(r) for r in alerts]}" if alerts else "")
          + (f"; stop on {[str(r) for r in stop_on]}" if stop_on else ""), file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, args.api_key), host=args.host, port=args.port, log_level="info")
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

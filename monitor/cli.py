"""The ``emoprobe`` command line. Each subcommand lives in ``monitor/commands/<name>.py``
and defines ``register(subparsers)``; this file only dispatches and turns known errors
into one-line messages (exit 2) instead of tracebacks."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("build", "read", "corpus", "calibrate", "export", "watch", "scan", "serve")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="emoprobe", description="Read a language model's functional emotions.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"monitor.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"monitor.commands.{name}":
                raise
            continue
        module.register(sub)
    for command in sub.choices.values():  # also accepted after the subcommand
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from probes.bank import BankError
    from probes.models import ModelError

    try:
        return int(args.func(args) or 0)
    except (ModelError, BankError, FileNotFoundError, ValueError, KeyError) as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"emoprobe {args.command}: error: {msg}  (--debug shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emoprobe {args.command}: interrupted; everything written so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``hipp`` command line. Each sub-command lives in its own module and registers itself here.

The engine holds no argparse; these modules parse arguments, call the engine and print results.
Errors the user can fix come out as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that define ``register(subparsers)``. Imported lazily so `hipp --help` stays fast.
COMMAND_MODULES = [
    "worker.cli.prune",
    "worker.cli.recover",
    "worker.cli.jobs",
    "worker.cli.datasets",
    "worker.cli.policies",
    "worker.cli.serve",
    "worker.cli.testbed",
    "worker.cli.evaluate",
    "worker.cli.search",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipp", description="HiPP-Prune: structured pruning of VLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from worker.hipp.errors import HippError

    try:
        return int(args.func(args) or 0)
    except HippError as exc:
        print(f"hipp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hipp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``hipp eval``: evaluate a model on POPE and/or ScienceQA files (placeholder until evaluation lands)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("eval", help="evaluate a model on POPE / ScienceQA")
    parser.set_defaults(func=lambda args: 0)

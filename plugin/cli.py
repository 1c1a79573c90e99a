"""The ``homesplit`` command line.

Each subcommand lives in its own module, which defines
``register(subparsers)``; the parser it adds sets ``handler`` to a function
that takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from homesplit import __version__
from homesplit.errors import HomesplitError

__all__ = ["build_parser", "main"]

# Modules that add subcommands, in the order `--help` lists them.
_COMMAND_MODULES: tuple[str, ...] = (
    "homesplit.cli_run",
    "homesplit.cli_sweep",
    "homesplit.cli_household",
    "homesplit.cli_plan",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="homesplit",
        description=(
            "Train one model split across the trusted devices of a household, "
            "and federate many households with Flower."
        ),
    )
    parser.add_argument("--version", action="version", version=f"homesplit {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of homesplit's own messages (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        return int(handler(args) or 0)
    except HomesplitError as exc:
        print(f"homesplit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"homesplit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

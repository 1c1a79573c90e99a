"""The ``homesplit`` command line.

Each subcommand lives in its own module, listed in `_COMMANDS`. The module
defines ``register(subparsers)``, and the parser it adds sets ``handler`` to
a function that takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from homesplit import __version__
from homesplit.errors import HomesplitError

__all__ = ["build_parser", "main"]

# Subcommands in the order `--help` lists them: name, module, one-line help.
# Only the module of the invoked subcommand is imported, because some of them
# load torch and Opacus, which takes seconds on a small device.
_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("run", "homesplit.cli_run", "run an experiment: a local Flower federation of households on loopback"),
    ("sweep", "homesplit.cli_sweep", "run an experiment once per privacy budget and seed; accuracy against epsilon"),
    ("household", "homesplit.cli_household", "create the household CA, enroll, list and revoke devices"),
    ("plan", "homesplit.cli_plan", "plan where to cut a model and which device runs each segment"),
)


# Signals that stop a command the way Ctrl-C does. The KeyboardInterrupt they
# raise unwinds through the code that started processes (`LocalFederation`,
# `run_local_pipelines`), which stops every process it started by PID. The
# default action of SIGTERM and SIGHUP would end this process at once and
# leave Flower's programs running.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignal(KeyboardInterrupt):
    """Interrupt raised in the main thread when the command receives one of `_STOP_SIGNALS`.

    Parameters
    ----------
    signum : int
        The signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _install_stop_handlers() -> dict[int, Callable | int | None]:
    """Make `_STOP_SIGNALS` raise `StopSignal` and return the previous handlers.

    Outside the main thread, where Python cannot set signal handlers, nothing
    changes and the result is empty.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        # The first signal starts an orderly stop. A second one, arriving
        # while `LocalFederation.stop` waits, makes it kill what is left at
        # once. A third would only break off that kill, so it is ignored.
        if len(received) <= 2:
            raise StopSignal(signum)

    previous = {}
    for signum in _STOP_SIGNALS:
        # A signal ignored from the start stays ignored, as shells arrange
        # for SIGINT in background jobs and nohup for SIGHUP.
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, stop)
    return previous


def _invoked_command(argv: Sequence[str]) -> str | None:
    names = {name for name, _, _ in _COMMANDS}
    return next((arg for arg in argv if arg in names), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the argument parser.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments about to be parsed. Only the subcommand named there gets
        its full parser; the others are listed by name and help alone. With
        None, every subcommand gets its full parser.
    """
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
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of homesplit's own messages (default: WARNING; progress is printed either way)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    invoked = None if argv is None else _invoked_command(argv)
    for name, module, summary in _COMMANDS:
        if argv is None or name == invoked:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    # force=True because importing Opacus configures the root logger first,
    # which would otherwise keep its own format and ignore --log-level.
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s", force=True
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    previous = _install_stop_handlers()
    try:
        return int(handler(args) or 0)
    except HomesplitError as exc:
        print(f"homesplit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StopSignal as exc:
        print(f"homesplit {args.command}: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        # Shells report a command ended by a signal with status 128 + signal number.
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"homesplit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


if __name__ == "__main__":
    sys.exit(main())

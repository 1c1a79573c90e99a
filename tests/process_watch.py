"""A process watcher for tests that start Flower's programs."""

from __future__ import annotations

import threading
from pathlib import Path

import psutil


class ProcessWatcher:
    """Record every descendant process of the test seen while it is active.

    With `flower_only` (the default) it records only Flower's programs, named
    by their script (``flower-supernode``, ``flwr-clientapp``, ...); otherwise
    every descendant, named by its executable, e.g. Ray's ``raylet``.

    A thread polls every 0.1 s, so short-lived per-message `flwr-clientapp`
    processes are seen too. LocalFederation makes the test process a child
    subreaper, so orphans stay in its tree.
    """

    def __init__(self, *, flower_only: bool = True) -> None:
        self.flower_only = flower_only
        self.seen: dict[int, psutil.Process] = {}
        self.programs: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for proc in psutil.Process().children(recursive=True):
                try:
                    program = next(
                        (Path(arg).name for arg in proc.cmdline() if Path(arg).name.startswith(("flower-", "flwr"))),
                        None,
                    )
                except psutil.Error:
                    continue
                if program is None and not self.flower_only:
                    program = proc.name()
                if program is not None:
                    self.seen.setdefault(proc.pid, proc)
                    self.programs.add(program)

    def still_running(self) -> list[str]:
        """Return the recorded processes that still exist, zombies included."""
        # is_running() compares creation times, so a reused PID does not count.
        return [f"{pid} {proc.name()}" for pid, proc in self.seen.items() if proc.is_running()]

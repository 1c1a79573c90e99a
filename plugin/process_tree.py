"""Child processes that are started, watched and stopped as whole trees.

Flower's programs start programs of their own: `flower-supernode` starts a
`flower-superexec`, which starts one `flwr-clientapp` per message, and
`flower-superlink` starts a `flower-superexec` in a new session, which starts
`flwr-serverapp`. Stopping only the process we started would leave those
behind. So every component starts in a session of its own, `ProcessTracker`
learns every session that a member of a known session creates, and stopping
signals every member of every known session by PID.

Linux reserves a PID while it is still the id of a live session or process
group, so signalling the members of a known session never reaches an
unrelated process that reused a number.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

__all__ = ["ManagedProcess", "ProcessTracker", "describe_exit", "set_child_subreaper", "strip_ansi"]

logger = logging.getLogger(__name__)

# prctl(2) options, from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

# Runs before the real program on Linux: PR_SET_PDEATHSIG makes the kernel
# send SIGTERM when the launching thread dies, so a launcher killed with SIGKILL (no clean-up
# code runs) does not leave a SuperLink or SuperNode running. It exits at once
# when the launcher died before prctl took effect.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_PDEATHSIG_TRAMPOLINE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def describe_exit(code: int) -> str:
    """Describe a `subprocess` return code: an exit code or a signal."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def set_child_subreaper(enabled: bool) -> bool:
    """Make this process adopt its orphaned descendants, and return the old setting.

    When a SuperNode dies, its `flower-superexec` and ClientApps become
    orphans. As a subreaper, this process adopts them instead of PID 1, so it
    can reap them: in containers whose PID 1 never calls wait(), they would
    otherwise stay as zombies. Without Linux prctl this does nothing and
    returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    previous = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_CHILD_SUBREAPER) failed with errno %d", ctypes.get_errno())
    return bool(previous.value)


class ManagedProcess:
    """One component, started in a session of its own, writing to a log file.

    Parameters
    ----------
    name : str
        Name used in logs and errors, e.g. ``"flower-supernode for household-a/phone"``.
    argv : Sequence[str]
        Program and arguments. The program is looked up on ``env["PATH"]``.
    log_path : Path
        File that receives the process's stdout and stderr.
    env : Mapping[str, str]
        Complete environment of the process.
    cwd : Path or None, default None
        Working directory; None keeps the current one.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._env = dict(env)
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """PID of the started process."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._popen.pid

    def start(self) -> None:
        """Start the process in a new session with its output in `log_path`."""
        argv = self.argv
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _PDEATHSIG_TRAMPOLINE, str(os.getpid()), *argv]
        with self.log_path.open("ab") as log_file:
            # The child keeps its own copy of the descriptor, so closing ours
            # right away is safe, and no pipe can fill up and block the child.
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        logger.debug("started %s with PID %d", self.name, self._popen.pid)

    def exit_code(self) -> int | None:
        """Return the return code if the process has ended, else None.

        The check does not reap the process: while unreaped, its PID stays
        reserved and the session can still be signalled safely.
        """
        if self._popen is None:
            return None
        if self._popen.returncode is not None:
            return self._popen.returncode
        try:
            info = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._popen.poll()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    def reap(self, timeout: float) -> int | None:
        """Collect the exit status, waiting at most `timeout` seconds."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 15) -> str:
        """Return the last `lines` lines of the log, without colour codes.

        The text starts with the log file's path, so that an error message
        built from it names the full log.
        """
        try:
            data = self.log_path.read_bytes()[-64 * 1024 :]
        except OSError:
            return ""
        text = strip_ansi(data.decode("utf-8", errors="replace"))
        return "\n".join([f"({self.log_path})", *text.splitlines()[-lines:]])


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes, which Flower's logger always writes."""
    return _ANSI_ESCAPE.sub("", text)


class ProcessTracker:
    """All sessions started for one federation, and their members.

    Attributes
    ----------
    processes : list of ManagedProcess
        Started components, in start order; each leads its own session.
    """

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []
        self._session_ids: set[int] = set()

    def add(self, process: ManagedProcess) -> None:
        """Track a started process and its session."""
        self.processes.append(process)
        self._session_ids.add(process.pid)

    def refresh(self) -> set[int]:
        """Learn new sessions created by known members and return all member PIDs.

        `flower-superlink` starts its `flower-superexec` in a new session, so
        that session is found through the member that created it. Calling this
        while the creator is alive matters: an orphan's parent is no longer
        the creator.
        """
        table = _process_table()
        while True:
            members = {pid for pid, (_, sid) in table.items() if sid in self._session_ids}
            new_sessions = {
                sid for pid, (ppid, sid) in table.items() if ppid in members and sid not in self._session_ids
            }
            if not new_sessions:
                return members
            logger.debug("tracking new sessions %s", sorted(new_sessions))
            self._session_ids |= new_sessions

    def live_members(self) -> list[int]:
        """Return the PIDs of members that have not exited (zombies excluded)."""
        alive = []
        for pid in self.refresh():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        return sorted(alive)

    def stop_all(self, *, grace: float, child_grace: float = 2.0, kill_timeout: float = 5.0) -> list[int]:
        """Stop every member of every tracked session and return the survivors.

        Every live member gets SIGTERM at once: first the components, then
        the programs that Flower started (`flower-superexec`, `flwr-serverapp`,
        `flwr-clientapp`). Those children get SIGKILL once they are still
        running `child_grace` seconds later. This is logged at DEBUG only,
        because Flower 1.42's `flower-superexec` often takes several seconds to
        exit on SIGTERM, even after a successful run. A component still running
        after `grace` seconds gets SIGKILL with a WARNING, or at DEBUG if
        `grace` is 0. The call then waits at most `kill_timeout` seconds for
        the killed processes to go, and reaps the exited components and
        adopted orphans.

        Parameters
        ----------
        grace : float
            Seconds the components may take to shut down on SIGTERM.
        child_grace : float, default 2.0
            Seconds Flower's child programs may take to exit on SIGTERM; at
            most `grace`.
        kill_timeout : float, default 5.0
            Seconds to wait for processes to exit after SIGKILL.

        Returns
        -------
        list of int
            PIDs still alive afterwards; empty unless SIGKILL failed.
        """
        # NOTE: a session created after this refresh by a component that then
        # exits (a SuperLink stopped while still starting its SuperExec) is
        # not found; Flower's own parent-PID monitor stops such a child.
        self.refresh()
        started = time.monotonic()
        components = {process.pid: process for process in self.processes}
        for process in self.processes:
            if process.exit_code() is None:
                _signal(process.pid, signal.SIGTERM)
        for pid in self.live_members():
            if pid not in components:
                _signal(pid, signal.SIGTERM)

        _wait_until(lambda: not self.live_members(), min(grace, child_grace))
        for pid in self.live_members():
            if pid not in components:
                _kill(pid, logging.DEBUG, f"is still running {time.monotonic() - started:.1f} s after SIGTERM")

        remaining = grace - (time.monotonic() - started)
        _wait_until(lambda: all(p.exit_code() is not None for p in self.processes), max(0.0, remaining))
        for pid in self.live_members():
            process = components.get(pid)
            if process is None:
                _kill(pid, logging.DEBUG, "is still running after the components stopped")
            elif process.exit_code() is None:
                # With no grace the caller asked for SIGKILL and has said why.
                level = logging.WARNING if grace > 0 else logging.DEBUG
                _kill(pid, level, f"did not stop within {grace:.1f} s of SIGTERM", name=process.name)
        _wait_until(lambda: not self.live_members(), kill_timeout)

        self._reap_all()
        survivors = self.live_members()
        if survivors:
            logger.error("PIDs %s survived SIGKILL; stop them by hand", survivors)
        return survivors

    def _reap_all(self, timeout: float = 2.0) -> None:
        """Reap the components and the adopted orphans of known sessions.

        A killed multi-threaded process shows as a zombie before its last
        thread has exited, and only then can it be reaped, so reaping polls
        for up to `timeout` seconds.
        """
        for process in self.processes:
            process.reap(timeout=1.0)

        table = _process_table()
        own_pid = os.getpid()
        pending = {pid for pid in self.refresh() if table.get(pid, (None, None))[0] == own_pid}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                try:
                    reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    # Reaped already, or adopted by PID 1 or another subreaper.
                    reaped_pid = pid
                if reaped_pid == pid:
                    pending.discard(pid)
            if pending:
                time.sleep(0.05)
        if pending:
            logger.warning("could not reap PIDs %s within %.1f s", sorted(pending), timeout)


def _process_table() -> dict[int, tuple[int, int]]:
    """Map every visible PID to its parent PID and session id."""
    table: dict[int, tuple[int, int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        try:
            table[proc.pid] = (proc.info["ppid"], os.getsid(proc.pid))
        except (ProcessLookupError, PermissionError):
            continue
    return table


def _kill(pid: int, level: int, reason: str, *, name: str | None = None) -> None:
    """Send SIGKILL to `pid` and log `reason` at `level`, unless the process has already exited.

    The message names the process by `name` if given, else by its program.
    """
    program = _describe_process(pid)
    if program is None:
        return
    logger.log(level, "%s (PID %d) %s; sending SIGKILL", name or program, pid, reason)
    _signal(pid, signal.SIGKILL)


def _describe_process(pid: int) -> str | None:
    """Return a process's program and arguments for a log message, or None if it has exited.

    The Python interpreter and the folders are left out, so that
    ``/venv/bin/python3 /venv/bin/flower-superexec --insecure`` reads
    ``flower-superexec --insecure``. A zombie counts as exited. A process
    that is exiting may have no command line any more, so its name and state
    stand in for it.
    """
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            command = process.cmdline()
            name, status = process.name(), process.status()
    except psutil.NoSuchProcess:
        # psutil.ZombieProcess is a NoSuchProcess as well.
        return None
    except psutil.Error:
        return f"process {pid}"
    if status in (psutil.STATUS_DEAD, psutil.STATUS_ZOMBIE):
        return None
    if not command:
        return f"{name or 'unnamed process'} ({status})"
    if len(command) > 1 and Path(command[0]).name.startswith("python") and not command[1].startswith("-"):
        command = command[1:]
    return " ".join([Path(command[0]).name, *command[1:]])


def _signal(pid: int, signum: signal.Signals) -> None:
    """Send a signal, ignoring a process that is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)

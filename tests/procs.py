"""Test peers in child processes: a verifying ``MultiStreamReceiver`` (and the plumbing that
``tests.faultproxy`` shares).

A child runs ``python -m <module> ...`` from the repository root and speaks the line-based
JSON protocol of ``tests._control`` on its stdin/stdout; its stderr (the log) goes to a
file, so no pipe can fill up and block it. The parent side here never waits without a
deadline, and every process it starts is reaped by pid: politely (a ``stop`` request),
then SIGTERM, then SIGKILL, each after a deadline. A child whose parent dies sees end of
stdin and exits.

Use the ``receiver_process`` fixture (a factory) in tests::

    def test_x(receiver_process):
        receiver = receiver_process(max_message_size=2 << 20, delay=0.001)
        ... MultiStreamTCPTransport(receiver.address) ... send(make_payload(0, seq, size))
        stats = receiver.wait_for(lambda s: s["delivered"] >= 10, timeout=10)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.payload import (
    ANONYMOUS,
    ID_SIZE,
    PayloadError,
    expected_identity,
    make_payload,
    verify_payload,
)

__all__ = [
    "ANONYMOUS",
    "ID_SIZE",
    "ChildError",
    "ChildProcess",
    "PayloadError",
    "ReceiverProcess",
    "expected_identity",
    "make_payload",
    "receiver_process_fixture",
    "seq_set",
    "verify_payload",
]

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0  # a cold interpreter importing dwcp on a loaded machine
REQUEST_TIMEOUT = 10.0
STOP_GRACE = 5.0  # a child's exit after SIGKILL, or an explicit stop()
STOP_REQUEST_TIMEOUT = 3.0  # close(): the polite stop request...
REAP_GRACE = 2.0  # ...then end of stdin, SIGTERM and SIGKILL, each given this long
LOG_TAIL_LINES = 60


class ChildError(RuntimeError):
    """A child process failed to start, died, or did not answer in time."""


def seq_set(ranges: list[list[int]]) -> set[int]:
    """Expand the ``[[first, last], ...]`` ranges of a stats() writer entry into a set."""
    return {seq for first, last in ranges for seq in range(first, last + 1)}


class ChildProcess:
    """One test peer process (restartable); see the module doc for the lifetime rules."""

    def __init__(self, module: str, args: list[str], *, log_path: Path | None = None) -> None:
        self._module = module
        self._args = list(args)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=module.rsplit(".", 1)[-1] + "-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = bytearray()
        self.ready: dict[str, Any] = {}

    # -- process lifetime -----------------------------------------------------------------

    def _spawn(self, extra_args: list[str] | None = None) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"---- start {self._module} {self._args + (extra_args or [])}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", self._module, *self._args, *(extra_args or [])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        self._procs.append(proc)
        self._proc = proc
        self._buffer.clear()
        try:
            ready: dict[str, Any] = json.loads(self._read_line(time.monotonic() + STARTUP_TIMEOUT))
        except BaseException:  # a timeout, garbage, or the test interrupted: no orphan
            self._reap(proc)
            raise
        if not ready.get("ready"):
            self._reap(proc)
            raise ChildError(f"{self._module} failed to start: {ready.get('error')}")
        self.ready = ready
        return ready

    @property
    def pid(self) -> int:
        """The pid of the current child."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def kill(self, sig: int = signal.SIGKILL, *, wait: bool | None = None) -> int | None:
        """Send ``sig`` to the child by pid; wait for it to exit (default: for SIGKILL/TERM/INT).

        Returns the exit status when waited for (negative: killed by that signal).
        """
        proc = self._proc
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(sig)
        if wait is None:
            wait = sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
        if not wait:
            return None
        try:
            return proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            raise ChildError(f"pid {proc.pid} did not exit after signal {sig}") from None

    def close(self) -> None:
        """Stop every process this object started: stop request, SIGTERM, SIGKILL; idempotent."""
        current = self._proc
        if current is not None and current.poll() is None:
            with contextlib.suppress(OSError):
                current.send_signal(signal.SIGCONT)  # a SIGSTOPped child cannot answer
            with contextlib.suppress(ChildError, OSError, ValueError):
                self.request("stop", reply_timeout=STOP_REQUEST_TIMEOUT)
        for proc in self._procs:
            self._reap(proc)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # a child at its control loop exits at end of stdin
        try:
            proc.wait(timeout=REAP_GRACE)
        except subprocess.TimeoutExpired:
            proc.terminate()
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout=REAP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_GRACE)
        if proc.stdout is not None:
            proc.stdout.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the child's log (stderr), for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- control channel ------------------------------------------------------------------

    def _read_line(self, deadline: float) -> bytes:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self._module} (pid {proc.pid}) did not answer in time")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                code = proc.wait(timeout=STOP_GRACE)
                raise ChildError(
                    f"{self._module} (pid {proc.pid}) exited with {code}; log:\n" + self.log_tail()
                )
            self._buffer += chunk

    def request(self, command: str, *, reply_timeout: float = REQUEST_TIMEOUT, **args: Any) -> Any:
        """Send one command and return its result; ChildError on failure or no reply in time."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise ChildError(f"{self._module} is not running")
            request_id = next(self._ids)
            line = json.dumps({"id": request_id, "cmd": command, **args}) + "\n"
            assert proc.stdin is not None
            try:
                proc.stdin.write(line.encode())
                proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise ChildError(f"{self._module} (pid {proc.pid}) is gone") from exc
            deadline = time.monotonic() + reply_timeout
            while True:
                reply = json.loads(self._read_line(deadline))
                if reply.get("id") == request_id:
                    break  # earlier ids: late answers to requests that timed out
        if not reply["ok"]:
            raise ChildError(f"{command} failed in {self._module}: {reply['error']}")
        return reply["result"]

    def poll_until(
        self,
        fetch: Callable[[], dict[str, Any]],
        predicate: Callable[[dict[str, Any]], object],
        timeout: float,
        interval: float = 0.01,
    ) -> dict[str, Any]:
        """Fetch until ``predicate`` holds and return that; AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            current = fetch()
            if predicate(current):
                return current
            if time.monotonic() > deadline:
                shown = {k: v for k, v in current.items() if k != "log"}
                raise AssertionError(
                    f"condition not met within {timeout}s; last: {shown}\n"
                    f"log of {self._module}:\n{self.log_tail()}"
                )
            threading.Event().wait(interval)  # a poll interval bounded by the deadline


def _stats_from_json(raw: dict[str, Any]) -> dict[str, Any]:
    raw["writers"] = {int(k): v for k, v in raw["writers"].items()}
    raw["anonymous"] = {int(k): v for k, v in raw["anonymous"].items()}
    return raw


class ReceiverProcess(ChildProcess):
    """A verifying ``MultiStreamReceiver`` in a child process (``tests.receiver_child``).

    ``stats()`` returns::

        {"delivered": int,            # on_message calls
         "bytes": int, "corrupted": int, "errors": [str, ...],
         "anonymous": {length: count},          # payloads too short to name a writer
         "writers": {writer_id: {"delivered": int, "duplicates": int,
                                 "out_of_order": int, "seqs": [[first, last], ...]}},
         "duplicates": int, "out_of_order": int,  # totals over writers
         "receiver_delivered": int, "sessions": int,  # the receiver's own counters
         "duplicates_dropped": int,  # resent messages it had delivered before
         "last_delivery": float | None,  # time.monotonic() (system-wide on Linux)
         "log": [[writer_id, seq, length], ...]}  # only with stats(log=True)
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int | None = None,
        max_buffered_bytes: int | None = None,
        max_sessions: int | None = None,
        idle_timeout: float | None = 300.0,
        frame_timeout: float | None = None,
        delay: float = 0.0,
        bind_timeout: float = 10.0,
        log_path: Path | None = None,
        journal: Path | None = None,
    ) -> None:
        args = ["--host", host, "--delay", repr(float(delay))]
        self.journal_path = journal
        if journal is not None:
            args += ["--journal", str(journal)]
        args += ["--bind-timeout", repr(float(bind_timeout))]
        args += ["--idle-timeout", "none" if idle_timeout is None else repr(float(idle_timeout))]
        if max_message_size is not None:
            args += ["--max-message-size", str(max_message_size)]
        if max_buffered_bytes is not None:
            args += ["--max-buffered-bytes", str(max_buffered_bytes)]
        if max_sessions is not None:
            args += ["--max-sessions", str(max_sessions)]
        if frame_timeout is not None:
            args += ["--frame-timeout", repr(float(frame_timeout))]
        super().__init__("tests.receiver_child", args, log_path=log_path)
        self.host = host
        ready = self._spawn(["--port", str(port)])
        self._port = int(ready["address"][1])

    @property
    def address(self) -> tuple[str, int]:
        """Where the receiver listens; the same port after ``restart()``."""
        return self.host, self._port

    def stats(self, *, log: bool = False) -> dict[str, Any]:
        return _stats_from_json(self.request("stats", log=log))

    def journal(self) -> dict[int, list[tuple[int, int]]]:
        """With ``journal=``: every delivery of every process so far, ``{pid: [(writer_id,
        seq), ...]}`` in delivery order; readable after a SIGKILL (the kernel kept it)."""
        assert self.journal_path is not None, "started without journal="
        by_pid: dict[int, list[tuple[int, int]]] = {}
        if not self.journal_path.exists():
            return by_pid
        for line in self.journal_path.read_text().splitlines():
            pid, writer, seq = (int(field) for field in line.split())
            by_pid.setdefault(pid, []).append((writer, seq))
        return by_pid

    def wait_delivered(self, count: int, timeout: float) -> bool:
        """Whether the receiver delivered ``count`` messages within ``timeout`` seconds."""
        return bool(
            self.request(
                "wait_delivered",
                count=count,
                timeout=timeout,
                reply_timeout=timeout + REQUEST_TIMEOUT,
            )
        )

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], object], timeout: float
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``predicate(stats)``; return them, AssertionError at timeout.

        The error shows the last stats, the child's log and where its threads were.
        """
        try:
            return self.poll_until(self.stats, predicate, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nreceiver threads:\n{self.stacks()}") from None

    def stacks(self) -> str:
        """The child's thread stacks right now ("?" when it cannot answer)."""
        try:
            return str(self.request("stacks", reply_timeout=5.0))
        except ChildError as exc:
            return f"? ({exc})"

    def set_delay(self, seconds: float) -> None:
        self.request("set_delay", seconds=seconds)

    def stop(self) -> None:
        """Stop the receiver and let the child exit (``restart()`` brings it back)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self.request("stop", reply_timeout=STOP_GRACE + 5.0)
            self._reap(proc)

    def restart(self) -> None:
        """Stop the current child if it still runs, and start a new one on the same port."""
        if self.alive:
            self.stop()
        elif self._proc is not None:
            self._reap(self._proc)  # killed: its pipes are still ours to close
        self._spawn(["--port", str(self._port)])


class SenderProcess(ChildProcess):
    """A paced acknowledged sender in a child process (``tests.sender_child``): writer
    ``writer``'s seqs 0, 1, ... to the receiver at ``address``, unaffected by pauses of the
    test process."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        writer: int,
        keepalive_interval: float = 5.0,
        send_timeout: float = 10.0,
        log_path: Path | None = None,
    ) -> None:
        args = ["--host", address[0], "--port", str(address[1]), "--writer", str(writer)]
        args += ["--keepalive-interval", repr(float(keepalive_interval))]
        args += ["--send-timeout", repr(float(send_timeout))]
        super().__init__("tests.sender_child", args, log_path=log_path)
        self._spawn()

    def status(self) -> dict[str, Any]:
        """``{"sent": n, "errors": [...]}``: seqs ``0 .. n-1`` were sent (send() returned)."""
        result: dict[str, Any] = self.request("status")
        return result

    def finish(self, timeout: float) -> dict[str, Any]:
        """Stop sending and flush (every sent message acknowledged) within ``timeout``."""
        result: dict[str, Any] = self.request(
            "finish", timeout=timeout, reply_timeout=2 * timeout + REQUEST_TIMEOUT
        )
        return result


@pytest.fixture(name="receiver_process")
def receiver_process_fixture(tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    """Factory: ``receiver_process(**ReceiverProcess options) -> ReceiverProcess``.

    Every child it started (restarts included) is stopped by pid at teardown; its log is
    printed then, which pytest shows for failed tests.
    """
    made: list[ReceiverProcess] = []

    def make(**kwargs: Any) -> ReceiverProcess:
        kwargs.setdefault("log_path", tmp_path / f"receiver-{len(made)}.log")
        receiver = ReceiverProcess(**kwargs)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()
        print(f"---- {receiver.log_path}\n{receiver.log_tail()}")

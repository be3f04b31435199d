"""The WAN benchmark: delivered rate across an emulated long, lossy path (issue 24).

Run as root, from the repository: ``python -m benchmarks.wan`` (the full run) or
``python -m benchmarks.wan --quick``.  Needs ``ip``, ``tc``, ``iperf3`` (``apt-get install -y
iperf3``) and pyzmq (the ``bench`` extra).

**The path.**  Two network namespaces, A (senders) and B (receivers), joined by two TUN
devices and a delay line (``benchmarks/wan_line.py``), a process that copies every packet
from one device to the other after the one-way delay, dropping each with the given
probability (data direction A to B; the ACK direction is lossless).  This kernel has no
``sch_netem``, hence a process.  The bottleneck is ``tbf`` on each TUN device's egress:
rate, and a queue of one bandwidth-delay product.  Each namespace defaults to
``--default-cc`` (cubic, the usual Linux default; the kernel then needs it in
``net.ipv4.tcp_allowed_congestion_control``, which is extended for the run and restored).
Everything is torn down on the way out, on an error and on Ctrl-C or SIGTERM too; a run
killed with SIGKILL leaves the namespaces, which the next run deletes first.

**Validation, in the output.**  The delay line's own capacity, with ``tbf`` lifted, so it
is seen not to be the bottleneck; then per loss rate iperf3 (cubic x1, cubic x4, bbr x1)
beside the Mathis bound MSS/RTT x 1.22/sqrt(p).  Every row also reports the delay line's
worst lateness (how long after its due time a packet left) and the packets the TUN device
dropped because the line did not read them in time: both near zero mean the emulator kept up.

**Rows.**  A raw socket as a user writes it (default options, one ``sendall`` of a length
prefix and the payload per message), pyzmq PUSH/PULL at defaults, and dwcp through
``Manager.send_with_circuit_breaker`` with 1, 4 and 8 streams, cubic and bbr,
acknowledged and not, every other setting at its default.  A row's sender sends for
``--seconds`` and, when fewer than ``--min-messages`` have arrived by then, until they have
or ``--cap`` passes.  Its rate is the bytes of the messages the receiver got whole, over the
time from the first send to the last of them; what is still in flight when the row ends is
not counted.  Ratios are to the best of the three iperf3 runs on the same path.

**Blackhole.**  Last, an acknowledged dwcp transfer of numbered messages across
``--blackhole`` seconds of 100 % loss both ways: when the session was found broken, and
whether every message whose send returned arrived exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path as FilePath
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from typing_extensions import Self

_REPO = FilePath(__file__).resolve().parent.parent
NS_A, NS_B = "dwcp-wan-a", "dwcp-wan-b"
TUN_A, TUN_B = "dwcpwan-a", "dwcpwan-b"
ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
IPERF_PORT = 5201
# MTU 1500 minus IPv4, TCP and the timestamp option: what one segment carries.
MSS = 1448
_ALLOWED = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0
MiB = 1 << 20


class BenchmarkError(Exception):
    """The path or a peer could not be set up, or a child did not answer in time."""


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode:
        raise BenchmarkError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _lines(child: subprocess.Popen[str]) -> queue.Queue[str]:
    """The lines ``child`` prints, read by a thread of their own (a select() on a buffered
    pipe can miss a second line already in the buffer); "" once it closed its stdout."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, name=f"lines-{child.pid}", daemon=True).start()
    return lines


def _readline(lines: queue.Queue[str], timeout: float, what: str) -> str:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if not line:
        raise BenchmarkError(f"{what}: no answer within {timeout:g} s")
    return line


def _stop(child: subprocess.Popen[str]) -> None:
    """Stop ``child`` by its pid: close its stdin, then SIGTERM, then SIGKILL."""
    if child.poll() is not None:
        return
    try:
        if child.stdin is not None:
            child.stdin.close()
    except OSError:
        pass
    try:
        child.wait(1.0)
        return
    except subprocess.TimeoutExpired:
        child.terminate()
    try:
        child.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(_STOP_TIMEOUT)


def _load() -> str:
    return " ".join(FilePath("/proc/loadavg").read_text().split()[:3])


class Path:
    """The emulated path between two namespaces; a context manager that always tears down."""

    def __init__(
        self, *, rtt: float, rate_mbit: float, queue_bytes: int, default_cc: str, realtime: bool
    ) -> None:
        self.rtt, self.rate_mbit, self.queue_bytes = rtt, rate_mbit, queue_bytes
        self.default_cc, self.realtime = default_cc, realtime
        self._children: list[subprocess.Popen[str]] = []
        self._line: subprocess.Popen[str] | None = None
        self._allowed_before: str | None = None
        self._iperf_server: subprocess.Popen[str] | None = None
        self._lines: dict[int, queue.Queue[str]] = {}

    def __enter__(self) -> Self:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _setup(self) -> None:
        existing = _run("ip", "netns", "list")
        for ns in (NS_A, NS_B):
            if ns in existing.split():  # left by a run killed with SIGKILL
                _run("ip", "netns", "del", ns)
        allowed = FilePath(_ALLOWED).read_text().split()
        if self.default_cc not in allowed:
            self._allowed_before = " ".join(allowed)
            FilePath(_ALLOWED).write_text(" ".join([*allowed, self.default_cc]))
        for ns in (NS_A, NS_B):
            _run("ip", "netns", "add", ns)
        command = [sys.executable, "-m", "benchmarks.wan_line", TUN_A, TUN_B]
        command += ["--delay-ab", str(self.rtt / 2), "--delay-ba", str(self.rtt / 2)]
        if self.realtime:
            command.append("--realtime")
        self._line = self._spawn(command)
        if _readline(self.lines(self._line), _READY_TIMEOUT, "delay line").strip() != "READY":
            raise BenchmarkError("the delay line did not start")
        for ns, dev, local, peer in ((NS_A, TUN_A, ADDR_A, ADDR_B), (NS_B, TUN_B, ADDR_B, ADDR_A)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", local, "peer", peer, "dev", dev)
            # A long ring between tbf and the delay line: a line descheduled for a few
            # milliseconds must not turn into losses that are not part of the path.
            _run("ip", "-n", ns, "link", "set", dev, "up", "txqueuelen", "10000")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "sysctl", "-qw",
                 f"net.ipv4.tcp_congestion_control={self.default_cc}")  # fmt: skip
        self.shape(self.rate_mbit)
        self._iperf_server = self.spawn(NS_B, ["iperf3", "-s", "-p", str(IPERF_PORT)], quiet=True)

    def _spawn(
        self, command: list[str], *, quiet: bool = False, pump: bool = True
    ) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None,
            text=True,
            cwd=_REPO,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the children
        )
        self._children.append(child)
        if pump:
            self._lines[child.pid] = _lines(child)
        return child

    def spawn(
        self, ns: str, command: list[str], *, quiet: bool = False, pump: bool = True
    ) -> subprocess.Popen[str]:
        """Start ``command`` inside namespace ``ns``; it is stopped by ``close()`` at the latest.
        ``quiet``: its stderr is discarded; ``pump``: its lines are read into ``lines(child)``
        (else the caller reads its stdout)."""
        return self._spawn(["ip", "netns", "exec", ns, *command], quiet=quiet, pump=pump)

    def lines(self, child: subprocess.Popen[str]) -> queue.Queue[str]:
        """What ``child`` printed, line by line."""
        return self._lines[child.pid]

    def shape(self, rate_mbit: float | None) -> None:
        """Put the bottleneck (``tbf``) on both devices; None lifts it."""
        for ns, dev in ((NS_A, TUN_A), (NS_B, TUN_B)):
            if rate_mbit is None:
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")
                continue
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{rate_mbit}mbit", "burst", "64kb",
                 "limit", str(self.queue_bytes))  # fmt: skip

    def _command(self, line: str) -> None:
        assert self._line is not None and self._line.stdin is not None
        self._line.stdin.write(line + "\n")
        self._line.stdin.flush()

    def set_loss(self, loss: float) -> None:
        self._command(f"loss {loss} 0")

    def line_stats(self) -> dict[str, Any]:
        """The delay line's counters since the last call (see ``benchmarks/wan_line.py``)."""
        assert self._line is not None
        self._command("stats")
        stats: dict[str, Any] = json.loads(_readline(self.lines(self._line), 10, "delay line"))
        return stats

    def ring_drops(self) -> int:
        """Packets the TUN device of A dropped because the delay line did not read them."""
        shown = json.loads(_run("ip", "-n", NS_A, "-s", "-j", "link", "show", "dev", TUN_A))
        return int(shown[0]["stats64"]["tx"]["dropped"])

    def close(self) -> None:
        for child in reversed(self._children):
            try:
                _stop(child)
            except Exception as exc:  # noqa: BLE001 - the rest must still be torn down
                print(f"(stopping pid {child.pid} failed: {exc!r})", file=sys.stderr)
        self._children.clear()
        for ns in (NS_A, NS_B):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if self._allowed_before is not None:
            FilePath(_ALLOWED).write_text(self._allowed_before)
            self._allowed_before = None


# -- validation ---------------------------------------------------------------------------------


def mathis_mbit(rtt: float, loss: float) -> float:
    """The Mathis et al. bound of one Reno-like stream: MSS/RTT x 1.22/sqrt(p), in Mbit/s."""
    return math.inf if loss <= 0 else MSS * 8 / rtt * 1.22 / math.sqrt(loss) / 1e6


# iperf3's server runs one test at a time and answers "the server is busy running a test"
# while it still winds up the previous one (seen once under load, which ended that run).
IPERF_BUSY_RETRIES = 5
IPERF_BUSY_PAUSE = 2.0


def _is_busy(error: str) -> bool:
    return "busy" in error.lower()


def iperf(path: Path, cc: str, parallel: int, seconds: float) -> dict[str, float]:
    """iperf3 from A to B: received Mbit/s and the sender's retransmissions.

    A server that answers "busy" is asked again, at most ``IPERF_BUSY_RETRIES`` more times,
    ``IPERF_BUSY_PAUSE`` s apart; each retry prints a line."""
    command = ["iperf3", "-c", ADDR_B, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    command += ["-C", cc, "-P", str(parallel)]
    for attempt in range(IPERF_BUSY_RETRIES + 1):
        child = path.spawn(NS_A, command, pump=False)
        try:
            out, _ = child.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"iperf3 {cc} x{parallel} did not finish") from exc
        result = json.loads(out)
        error = str(result.get("error", ""))
        if not error:
            break
        if not _is_busy(error) or attempt == IPERF_BUSY_RETRIES:
            raise BenchmarkError(f"iperf3 {cc} x{parallel}: {error}")
        print(f"(iperf3 {cc} x{parallel}: server busy ({error}); retry {attempt + 1} of "
              f"{IPERF_BUSY_RETRIES} in {IPERF_BUSY_PAUSE:g} s)", flush=True)  # fmt: skip
        time.sleep(IPERF_BUSY_PAUSE)  # the server finishes its previous test meanwhile
    end = result["end"]
    return {
        "mbit": end["sum_received"]["bits_per_second"] / 1e6,
        "retransmits": end["sum_sent"].get("retransmits", 0),
    }


# -- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    kind: str  # raw, zmq or dwcp
    size: int
    streams: int = 1
    cc: str | None = None  # None: the namespace's default
    ack: bool = False
    send_timeout: float | None = None  # None: the transport's default

    def label(self, default_cc: str) -> str:
        cc = self.cc or f"{default_cc} (default)"
        size = f"{self.size // MiB} MiB"
        if self.kind == "dwcp":
            mode = "acked" if self.ack else "unacked"
            if self.send_timeout:
                mode += f", send_timeout={self.send_timeout:g}"
            return f"dwcp {self.streams} stream{'s' * (self.streams > 1)}, {cc}, {mode}, {size}"
        name = "raw socket" if self.kind == "raw" else "pyzmq PUSH/PULL"
        return f"{name}, {cc}, {size}"


@dataclass
class Timing:
    seconds: float  # the sender sends at least this long
    cap: float  # and at most this long, waiting for min_messages
    min_messages: int


def run_row(path: Path, row: Row, port: int, timing: Timing) -> dict[str, Any]:
    """One row: a receiver in B, a sender in A, the delivered rate."""
    peer = [sys.executable, "-m", "benchmarks.wan_peer"]
    receiver = path.spawn(NS_B, [*peer, "recv", row.kind, "--port", str(port)])
    out = path.lines(receiver)
    try:
        if _readline(out, _READY_TIMEOUT, "receiver").strip() != "READY":
            raise BenchmarkError("the receiver did not start")
        command = [*peer, "send", row.kind, "--host", ADDR_B, "--port", str(port)]
        command += ["--size", str(row.size), "--streams", str(row.streams)]
        if row.cc:
            command += ["--cc", row.cc]
        if row.ack:
            command.append("--ack")
        if row.send_timeout:
            command += ["--send-timeout", str(row.send_timeout)]
        path.line_stats()  # resets its counters
        drops_before = path.ring_drops()
        sender = path.spawn(NS_A, command)
        try:
            start = json.loads(_readline(path.lines(sender), 60, "sender"))["start"]

            def peek() -> dict[str, float]:
                assert receiver.stdin is not None
                receiver.stdin.write("peek\n")
                receiver.stdin.flush()
                snapshot: dict[str, float] = json.loads(_readline(out, 10, "receiver"))
                return snapshot

            time.sleep(max(0.0, start + timing.seconds - time.monotonic()))
            got = peek()
            while got["count"] < timing.min_messages and time.monotonic() < start + timing.cap:
                time.sleep(0.5)  # polling a child for progress, bounded by the cap
                if sender.poll() is not None:
                    break
                got = peek()
            assert sender.stdin is not None
            sender.stdin.close()
            report = json.loads(_readline(path.lines(sender), 30, "sender report"))
        finally:
            _stop(sender)
    finally:
        _stop(receiver)
    line = path.line_stats()
    elapsed = got["last"] - start
    return {
        "row": row.label(path.default_cc),
        "kind": row.kind,
        "streams": row.streams,
        "cc": row.cc or path.default_cc,
        "ack": row.ack,
        "size": row.size,
        "messages": int(got["count"]),
        "mbit": got["bytes"] * 8 / elapsed / 1e6 if got["count"] else 0.0,
        "seconds": round(elapsed, 1) if got["count"] else None,
        "errors": report.get("errors", {}),
        "first_errors": report.get("first_errors", {}),
        "sessions": report.get("sessions", 0),
        "late_max_ms": line["ab"]["late_max_ms"],
        "ring_drops": path.ring_drops() - drops_before,
        "load": _load(),
    }


def run_blackhole(path: Path, port: int, blackhole: float) -> dict[str, Any]:
    """An acknowledged dwcp transfer (4 streams, bbr, 1 MiB numbered messages) across a
    ``blackhole``-second outage of the path (100 % loss both ways): when the sender noticed,
    and whether the receiver got every message whose send returned, once."""
    before, after = 10.0, 20.0
    path.set_loss(0)
    peer = [sys.executable, "-m", "benchmarks.wan_peer"]
    receiver = path.spawn(NS_B, [*peer, "recv", "dwcp", "--port", str(port), "--sequence"])
    out = path.lines(receiver)

    def peek() -> dict[str, float]:
        assert receiver.stdin is not None
        receiver.stdin.write("peek\n")
        receiver.stdin.flush()
        snapshot: dict[str, float] = json.loads(_readline(out, 10, "receiver"))
        return snapshot

    try:
        if _readline(out, _READY_TIMEOUT, "receiver").strip() != "READY":
            raise BenchmarkError("the receiver did not start")
        command = [*peer, "send", "dwcp", "--host", ADDR_B, "--port", str(port), "--ack"]
        command += ["--cc", "bbr", "--streams", "4", "--size", str(MiB), "--sequence"]
        sender = path.spawn(NS_A, command)
        try:
            start = json.loads(_readline(path.lines(sender), 60, "sender"))["start"]
            time.sleep(max(0.0, start + before - time.monotonic()))
            path._command("loss 1 1")
            began = time.monotonic()
            time.sleep(blackhole)
            path.set_loss(0)
            healed = time.monotonic()
            time.sleep(after)
            assert sender.stdin is not None
            sender.stdin.close()  # it stops sending, flushes its window (<= 120 s), reports
            report = json.loads(_readline(path.lines(sender), 150, "sender report"))
        finally:
            _stop(sender)
        got = peek()
        deadline = time.monotonic() + 60
        while got["next"] < report["sent"] and time.monotonic() < deadline:
            time.sleep(0.5)  # polling a child for the last deliveries, bounded
            got = peek()
    finally:
        _stop(receiver)
    broken = [(at - began, why) for at, why in report.get("broken_at", [])]
    return {
        "blackhole": blackhole,
        "healed_after": healed - began,
        "sent": report["sent"],
        "delivered": int(got["count"]),
        "duplicates": int(got["duplicates"]),
        "missing": int(got["missing"]) + max(0, report["sent"] - int(got["next"])),
        "broken": broken,
        "sessions": report.get("sessions", 0),
        "errors": report.get("errors", {}),
        "first_errors": report.get("first_errors", {}),
        "flush_error": report.get("flush_error"),
        "load": _load(),
    }


def print_blackhole(r: dict[str, Any]) -> None:
    print(f"\n## blackhole: {r['blackhole']:g} s of 100 % loss both ways (load {r['load']})\n")
    print("dwcp 4 streams, bbr, acknowledged, 1 MiB numbered messages, Manager at defaults "
          "(keepalive 5 s + 10 s, send_timeout 10 s); the outage starts 10 s in.\n")  # fmt: skip
    noticed = (
        ", ".join(f"+{at:.1f} s ({why})" for at, why in r["broken"])
        or "never (the session rode it out)"
    )
    print(f"- session broken at: {noticed}; sessions opened: {r['sessions']}")
    print(f"- sends that returned: {r['sent']}; delivered: {r['delivered']}, duplicates: "
          f"{r['duplicates']}, missing: {r['missing']}")  # fmt: skip
    print(f"- send errors: {_errors(r)}; flush at the end: {r['flush_error'] or 'ok'}")
    for message in r["first_errors"].values():
        print(f"- first of its kind: {message}")


def rows_for(quick: bool, sizes: list[int]) -> list[Row]:
    rows: list[Row] = []
    if quick:
        size = MiB
        rows += [Row("zmq", size), Row("raw", size)]
        rows += [Row("dwcp", size, streams=n, cc="cubic") for n in (1, 4, 8)]
        rows += [Row("dwcp", size, streams=n, cc="bbr") for n in (1, 4)]
        rows += [Row("dwcp", size, streams=4, cc="bbr", ack=True)]
        rows += [Row("dwcp", 16 * MiB, streams=4, cc=cc, ack=True) for cc in ("cubic", "bbr")]
        rows += [Row("dwcp", 16 * MiB, streams=4, cc="cubic", ack=True, send_timeout=120)]
        return rows
    for size in sizes:
        rows += [Row("zmq", size), Row("raw", size), Row("raw", size, cc="bbr")]
        for ack in (False, True):
            for cc in ("cubic", "bbr"):
                rows += [Row("dwcp", size, streams=n, cc=cc, ack=ack) for n in (1, 4, 8)]
        if size >= 16 * MiB:
            # send_timeout (10 s) bounds every send, whatever its size: a 16 MiB message
            # on cubic at 1 % loss needs longer. This row shows what is left without it.
            rows += [Row("dwcp", size, streams=4, cc="cubic", ack=True, send_timeout=120)]
    return rows


# -- output ---------------------------------------------------------------------------------------


def _errors(result: dict[str, Any]) -> str:
    errors = result["errors"]
    return ", ".join(f"{k} x{v}" for k, v in errors.items()) if errors else "-"


_HEADER = (
    "| row | Mbit/s | x iperf3 best | x pyzmq | messages (s) | send errors | sessions "
    "| line late max ms / ring drops | load |\n|---|---|---|---|---|---|---|---|---|"
)


def print_row(r: dict[str, Any], best: float, zmq: float | None) -> None:
    """One table row; ``zmq``: pyzmq's rate at the same message size, if measured."""
    versus_zmq = f"{r['mbit'] / zmq:.1f}" if zmq else "-"
    sessions = r["sessions"] if r["kind"] == "dwcp" else "-"
    print(
        f"| {r['row']} | {r['mbit']:.1f} | {r['mbit'] / best:.2f} | {versus_zmq} "
        f"| {r['messages']} ({r['seconds']}) | {_errors(r)} | {sessions} "
        f"| {r['late_max_ms']:.1f} / {r['ring_drops']} | {r['load']} |",
        flush=True,
    )


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: the path is torn down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short subset (a few minutes)")
    parser.add_argument("--rtt", type=float, default=0.050, help="seconds (default 0.050)")
    parser.add_argument("--rate", type=float, default=200.0, help="bottleneck, Mbit/s")
    parser.add_argument("--queue", type=int, default=0, help="bytes (default: one BDP)")
    parser.add_argument("--loss", type=float, nargs="*", help="percent; default by mode")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 16], help="MiB")
    parser.add_argument("--seconds", type=float, default=0.0, help="per row (default by mode)")
    parser.add_argument("--cap", type=float, default=0.0, help="longest row, seconds")
    parser.add_argument("--min-messages", type=int, default=3)
    parser.add_argument(
        "--kinds", nargs="*", choices=["raw", "zmq", "dwcp"], help="only these rows (default: all)"
    )
    parser.add_argument(
        "--streams", type=int, nargs="*", help="only dwcp rows with these stream counts"
    )
    parser.add_argument("--iperf-seconds", type=float, default=0.0)
    parser.add_argument("--default-cc", default="cubic", help="the namespaces' default")
    parser.add_argument("--no-realtime", action="store_true", help="delay line not SCHED_FIFO")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument(
        "--blackhole", type=float, default=10.0, help="seconds of outage at the end (0: none)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks.wan needs root (network namespaces, TUN, tc)")
    for tool in ("ip", "tc", "iperf3"):
        if shutil.which(tool) is None:
            sys.exit(f"benchmarks.wan needs {tool} (iperf3: apt-get install -y iperf3)")
    quick = args.quick
    losses = args.loss if args.loss is not None else ([0.1, 1] if quick else [0, 0.01, 0.1, 1])
    seconds = args.seconds or (8.0 if quick else 12.0)
    timing = Timing(seconds, args.cap or (40.0 if quick else 90.0), args.min_messages)
    iperf_seconds = args.iperf_seconds or (8.0 if quick else 12.0)
    bdp = int(args.rate * 1e6 / 8 * args.rtt)
    queue = args.queue or bdp
    rows = rows_for(quick, [s * MiB for s in args.sizes])
    if args.kinds:
        rows = [row for row in rows if row.kind in args.kinds]
    if args.streams:
        rows = [row for row in rows if row.kind != "dwcp" or row.streams in args.streams]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    everything: dict[str, Any] = {"args": vars(args), "levels": []}
    print(f"# WAN benchmark: RTT {args.rtt * 1000:g} ms, bottleneck {args.rate:g} Mbit/s, "
          f"queue {queue} bytes ({queue / bdp:.2f} BDP), namespaces default {args.default_cc}, "
          f"{'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"# command: {' '.join([os.path.basename(sys.executable), '-m', 'benchmarks.wan', *sys.argv[1:]])}")  # fmt: skip
    with Path(
        rtt=args.rtt,
        rate_mbit=args.rate,
        queue_bytes=queue,
        default_cc=args.default_cc,
        realtime=not args.no_realtime,
    ) as path:
        # The emulator alone: no bottleneck, no loss. Well above the bottleneck means the
        # delay line is not what limits the rows.
        path.shape(None)
        path.set_loss(0)
        path.line_stats()
        capacity = iperf(path, "bbr", 1, iperf_seconds)
        line = path.line_stats()
        print(f"\nDelay line alone (no tbf, no loss), iperf3 bbr x1: {capacity['mbit']:.0f} Mbit/s "
              f"= {capacity['mbit'] / args.rate:.1f}x the bottleneck; worst lateness "
              f"{line['ab']['late_max_ms']:.1f} ms, mean {line['ab']['late_mean_ms']:.2f} ms; "
              f"load {_load()}")  # fmt: skip
        everything["capacity"] = {"iperf": capacity, "line": line}
        path.shape(args.rate)
        port = 7400
        for loss_percent in losses:
            loss = loss_percent / 100
            path.set_loss(loss)
            mathis = mathis_mbit(args.rtt, loss)
            checks = {}
            for cc, parallel in (("cubic", 1), ("cubic", 4), ("bbr", 1)):
                checks[f"{cc} x{parallel}"] = iperf(path, cc, parallel, iperf_seconds)
            best = max(c["mbit"] for c in checks.values())
            bound = "n/a (no loss)" if math.isinf(mathis) else f"{mathis:.1f}"
            print(f"\n## loss {loss_percent:g} % (load {_load()})\n")
            print(f"iperf3 ({iperf_seconds:g} s each): " + ", ".join(
                f"{name} {c['mbit']:.1f} Mbit/s ({c['retransmits']} retr.)"
                for name, c in checks.items()) + f"; Mathis bound of one stream: {bound}\n")  # fmt: skip
            results: list[dict[str, Any]] = []
            zmq: dict[int, float] = {}
            print(_HEADER)
            for row in rows:
                port += 1
                try:
                    result = run_row(path, row, port, timing)
                except BenchmarkError as exc:
                    print(f"| {row.label(args.default_cc)} | failed: {exc} |", flush=True)
                    continue
                if row.kind == "zmq" and result["mbit"]:
                    zmq[row.size] = result["mbit"]
                print_row(result, best, zmq.get(row.size))
                results.append(result)
            print()
            for r in results:
                for message in r["first_errors"].values():
                    print(f"- {r['row']}: first of its kind: {message}")
            everything["levels"].append(
                {"loss_percent": loss_percent, "mathis": mathis, "iperf": checks, "rows": results}
            )
            if args.json:
                FilePath(args.json).write_text(json.dumps(everything, indent=1, default=str))
        if args.blackhole:
            port += 1
            try:
                result = run_blackhole(path, port, args.blackhole)
            except BenchmarkError as exc:
                print(f"\n## blackhole: failed: {exc}")
            else:
                print_blackhole(result)
                everything["blackhole"] = result
                if args.json:
                    FilePath(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Scenario 8: end to end, messages *delivered* per second, counted where they arrive.

Every receiver runs in a child process of its own (``benchmarks/e2e_peer.py``) and counts
what it has fully received and parsed; the sender runs here.  A measurement is timed from
the first send until the child reports, over its stats port, that all N messages arrived,
so what the kernel's socket buffers absorb (or a sender's queue holds) is not counted.
Nothing is pinned to a core, and hand-written sockets keep their default options.

Rows:

- dwcp through a default ``Manager`` against a hand-framed socket and pyzmq at their
  defaults, at 1 KiB, 64 KiB and 1 MiB, with CPU per GB of both processes, and the latency
  rows: ``benchmarks/e2e_compare.py`` (the default of ``python3 -m benchmarks.e2e``);
- 4 streams vs 1 for 16 MiB messages, plus a long run that must not stall;
- 32 threads sending 8 MiB messages through one 4-stream transport, where the target is
  correctness (every send bounded, every returned send delivered);
- acknowledged vs unacknowledged (``--acked``) and 8 sender threads (``--senders``).

The last three call ``transport.send`` directly: they compare dwcp with itself (or, for the
sender threads, with a length prefix under a lock).  Every wait has a deadline: a stall
becomes a failed row with a note, never a hung benchmark, and every child is terminated
(then killed) on the way out.
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from benchmarks.harness import Result, alternate, paired_ratio
from dwcp.transport import MultiStreamTCPTransport

try:
    import zmq

    HAVE_ZMQ = True
except ImportError:  # pyzmq is optional: pip install '.[bench]'
    HAVE_ZMQ = False

if TYPE_CHECKING:  # typing.Self is 3.11+ and setup.cfg still allows 3.10
    from typing_extensions import Self

Send = Callable[[bytes], object]
T = TypeVar("T")

# Longest one measurement may take, its sends included.
_MEASURE_TIMEOUT = 120.0
# No delivery progress for this long is a stall, however much of the deadline is left: a
# deadlocked receiver is then reported in seconds rather than minutes.
_STALL_AFTER = 20.0
_START_TIMEOUT = 30.0  # for a child to print its ports
_STATS_TIMEOUT = 10.0  # a child answers a stats request within half a second
_STOP_TIMEOUT = 5.0  # after terminate() before kill(), and after kill()
_CLOSE_TIMEOUT = 15.0  # for a transport's close(); a wedged one must not wedge us
_REPO = Path(__file__).resolve().parent.parent
_LENGTH = struct.Struct("!I")
# Up to this size one copy of header + payload into one buffer is cheaper than a two-part
# sendmsg(); the same trade-off (and value) as dwcp's sender.
_COALESCE_LIMIT = 16 * 1024


class MeasurementFailed(Exception):
    """A measurement could not finish: a send raised, or delivery stalled or ran late."""


# -- the child process ----------------------------------------------------------------------------


class Peer:
    """One ``benchmarks.e2e_peer`` child: started with its kind, stopped by its pid."""

    def __init__(
        self,
        kind: str,
        *,
        max_message_size: int | None = None,
        message_size: int | None = None,
    ) -> None:
        self.kind = kind
        #: CPU seconds the child had used (every thread) at its last answer.
        self.cpu = 0.0
        args = [sys.executable, "-m", "benchmarks.e2e_peer", kind]
        if max_message_size is not None:
            args += ["--max-message-size", str(max_message_size)]
        if message_size is not None:
            args += ["--message-size", str(message_size)]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_REPO
        )
        self._stats: socket.socket | None = None
        try:
            data_port, stats_port = self._read_ports()
            self.port = data_port
            self.address = ("127.0.0.1", data_port)
            self._stats = socket.create_connection(("127.0.0.1", stats_port), _START_TIMEOUT)
            self._stats.settimeout(_STATS_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _read_ports(self) -> tuple[int, int]:
        stdout = self._proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], _START_TIMEOUT)
        if not ready:
            raise RuntimeError(f"{self.kind} peer printed no ports within {_START_TIMEOUT:g} s")
        fields = stdout.readline().split()
        if len(fields) != 2:
            raise RuntimeError(f"{self.kind} peer failed to start (exit {self._proc.poll()})")
        return int(fields[0]), int(fields[1])

    def count(self, target: int = 0) -> int:
        """The child's count: at once for target 0, else once it reaches ``target`` or half a
        second has passed, whichever comes first.  Also updates ``cpu``."""
        stats = self._stats
        if stats is None:
            raise MeasurementFailed(f"{self.kind} peer's stats channel failed earlier")
        try:
            stats.sendall(target.to_bytes(8, "big"))
            data = b""
            while len(data) < 16:
                part = stats.recv(16 - len(data))
                if not part:
                    raise OSError("closed by the peer")
                data += part
        except OSError as exc:  # socket.timeout included
            # A late answer would be read as the next one's: this channel is done for.
            stats.close()
            self._stats = None
            raise MeasurementFailed(f"{self.kind} peer's stats channel: {exc!r}") from exc
        self.cpu = int.from_bytes(data[8:], "big") / 1e9
        return int.from_bytes(data[:8], "big")

    def wait_for(self, target: int, *, base: int, deadline: float, stall: float) -> None:
        """Return once the count reaches ``target``; raise MeasurementFailed on a stall (no
        progress for ``stall`` seconds) or at ``deadline`` (a ``time.monotonic()`` value)."""
        last, progressed = -1, time.monotonic()
        while True:
            got = self.count(target)
            if got >= target:
                return
            now = time.monotonic()
            if got != last:
                last, progressed = got, now
            reason = None
            if now - progressed >= stall:
                reason = f"stalled (no delivery for {stall:g} s)"
            elif now >= deadline:
                reason = "deadline passed"
            if reason is not None:
                unit = "bytes" if self.kind == "raw" else "messages"
                raise MeasurementFailed(
                    f"{reason}: {got - base:,} of {target - base:,} {unit} arrived"
                )

    def settle(self, *, quiet: float = 1.0, timeout: float = 15.0) -> int:
        """The count once it has stopped changing for ``quiet`` seconds (or at ``timeout``)."""
        deadline = time.monotonic() + timeout
        last, since = self.count(), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.count()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def stop(self) -> None:
        """Terminate the child by pid, kill it if it lingers; never leaves it running."""
        if self._stats is not None:
            self._stats.close()
        proc = self._proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# -- senders --------------------------------------------------------------------------------------


def _kernel_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO on a blocking socket: bounds every send without the poll() per call that
    ``settimeout()`` costs (dwcp's sender bounds its writes the same way)."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except OSError:
        sock.settimeout(seconds)


@contextmanager
def _tcp_connection(address: tuple[str, int]) -> Iterator[socket.socket]:
    """A connection as a user opens one: default options (Nagle on).  SO_SNDTIMEO is the one
    addition, a kernel timer consulted only while a send blocks, so that a stalled reader
    fails the measurement instead of hanging the benchmark."""
    sock = socket.create_connection(address, _START_TIMEOUT)
    try:
        sock.settimeout(None)
        _kernel_send_timeout(sock, _MEASURE_TIMEOUT)
        yield sock
    finally:
        sock.close()


def framed_sender(sock: socket.socket) -> Send:
    """A 4-byte big-endian length prefix per message: one ``sendall`` of prefix + payload for
    small messages, a two-part ``sendmsg`` (writev) for large ones."""
    pack = _LENGTH.pack
    sendall, sendmsg = sock.sendall, sock.sendmsg

    def send(payload: bytes) -> None:
        size = len(payload)
        if size <= _COALESCE_LIMIT:
            sendall(pack(size) + payload)
            return
        header = pack(size)
        sent = sendmsg((header, payload))
        if sent < size + 4:  # a partial write: finish it
            if sent < 4:
                sendall(header[sent:])
                sent = 4
            sendall(memoryview(payload)[sent - 4 :])

    return send


@contextmanager
def _zmq_sender(port: int, *, copy: bool = True) -> Iterator[Send]:
    """A PUSH socket at pyzmq's defaults (SNDHWM 1000, ``send()`` copying unless ``copy`` is
    False), but SNDTIMEO, so that a stalled reader fails the measurement instead of hanging
    it (libzmq reads the timeout only when a send would block), and LINGER 0 for the close."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.SNDTIMEO, int(_MEASURE_TIMEOUT * 1000))
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"tcp://127.0.0.1:{port}")
        # copy=False still copies below zmq.COPY_THRESHOLD (64 KiB) and hands larger
        # payloads to libzmq without a copy.
        yield push.send if copy else partial(push.send, copy=False)
    finally:
        push.close(linger=0)
        context.term()


def _close_within(close: Callable[[], object], timeout: float) -> bool:
    """Run ``close`` on a daemon thread; False if it has not returned within ``timeout``."""

    def run() -> None:
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - reported, and must not stop the cleanup
            print(f"(close failed: {exc!r})", file=sys.stderr)

    thread = threading.Thread(target=run, name="bench-close", daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


@contextmanager
def _dwcp_transport(address: tuple[str, int], **options: Any) -> Iterator[MultiStreamTCPTransport]:
    options.setdefault("checksum", True)
    transport = MultiStreamTCPTransport(address, **options)
    transport.start()
    try:
        yield transport
    finally:
        if not _close_within(transport.close, _CLOSE_TIMEOUT):
            print(f"(transport close() still blocked after {_CLOSE_TIMEOUT:g} s)", file=sys.stderr)


# -- one measurement ------------------------------------------------------------------------------


def delivered_per_second(
    peer: Peer,
    send: Send,
    payload: bytes,
    count: int,
    *,
    per_message: int = 1,
    timeout: float = _MEASURE_TIMEOUT,
    stall: float = _STALL_AFTER,
) -> float:
    """Messages per second from the first send until ``peer`` counted all ``count`` of them.

    ``per_message`` is what one message adds to the peer's count (its size for the raw
    drain, which counts bytes).  The deadline is checked once per batch of sends, not per
    send, so the check costs the loop nothing measurable.
    """
    base = peer.count()
    target = base + count * per_message
    batch = max(1, min(1024, 2**20 // max(len(payload), 1)))
    began = time.perf_counter()
    deadline = time.monotonic() + timeout
    sent = 0
    try:
        while sent < count:
            n = min(batch, count - sent)
            for _ in range(n):
                send(payload)
            sent += n
            if time.monotonic() > deadline:
                raise MeasurementFailed(f"sends unfinished after {timeout:g} s")
    except MeasurementFailed:
        raise
    except Exception as exc:  # TransportError, OSError, zmq.Again alike
        raise MeasurementFailed(f"a send after {sent:,} of {count:,} raised {exc!r}") from exc
    peer.wait_for(target, base=base, deadline=deadline, stall=stall)
    return count / (time.perf_counter() - began)


def _labelled(name: str, measure: Callable[[int], T]) -> Callable[[int], T]:
    """``measure`` with failures prefixed by the contender's name."""

    def run(count: int) -> T:
        try:
            return measure(count)
        except MeasurementFailed as exc:
            raise MeasurementFailed(f"{name}: {exc}") from exc

    return run


def rotate(
    contenders: dict[str, Callable[[int], T]], *, count: int, rounds: int, warmup: int
) -> tuple[dict[str, list[T]], str | None]:
    """``harness.alternate`` for more than two contenders: after one warm-up pass of
    ``warmup`` messages each, every round runs each contender once on ``count`` messages,
    the one going first rotating from round to round, so the machine's drift lands on all
    alike and the i-th samples of any two contenders come from the same short round (the
    pairs ``paired_ratio`` divides).

    Returns the samples of the complete rounds and, if a measurement failed, why (the
    remaining rounds are skipped: a stalled contender would only stall again)."""
    names = list(contenders)
    samples: dict[str, list[T]] = {name: [] for name in names}
    try:
        for name in names:
            contenders[name](warmup)
        for i in range(rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(contenders[name](count))
    except MeasurementFailed as exc:
        complete = min(len(s) for s in samples.values())
        return {name: s[:complete] for name, s in samples.items()}, str(exc)
    return samples, None


def _median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else 0.0


def _per_round(ours: list[float], reference: list[float]) -> str:
    """The notes' list of paired per-round ratios."""
    return "; ratios per round " + ", ".join(f"{o / r:.2f}" for o, r in zip(ours, reference))


def _size(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size // 1024} KiB"


# -- row 2: 4 streams vs 1 at 16 MiB, and a long run that must not stall ----------------------------

_BIG = 16 * 2**20
_BIG_CHUNK = 4 * 2**20
_BIG_LIMIT = 32 * 2**20


def _big_transport(peer: Peer, streams: int) -> AbstractContextManager[MultiStreamTCPTransport]:
    return _dwcp_transport(
        peer.address,
        streams=streams,
        chunk_size=_BIG_CHUNK,
        max_message_size=_BIG_LIMIT,
        send_timeout=60.0,
    )


def multistream(quick: bool) -> list[Result]:
    """4 streams vs 1, 16 MiB messages in 4 MiB chunks; then 1,000 of them on 4 streams.

    Not pinned: four streams gain only when their connections' kernel copies can run on
    both cores at once (as in scenario 3)."""
    return [_four_vs_one(quick), _no_stall(quick)]


def _four_vs_one(quick: bool) -> Result:
    # 1 GB per measurement in full mode: about half a second at loopback speed.
    count, rounds = (16, 3) if quick else (64, 7)
    payload = os.urandom(_BIG)
    failure = None
    ours = reference = 0.0
    ratio = None
    with ExitStack() as stack:
        # Separate receivers, so a session wedged by one contender cannot slow the other.
        one_peer = stack.enter_context(Peer("dwcp", max_message_size=_BIG_LIMIT))
        four_peer = stack.enter_context(Peer("dwcp", max_message_size=_BIG_LIMIT))
        one = stack.enter_context(_big_transport(one_peer, 1))
        four = stack.enter_context(_big_transport(four_peer, 4))
        four_rate = _labelled(
            "4 streams", partial(delivered_per_second, four_peer, four.send, payload)
        )
        one_rate = _labelled("1 stream", partial(delivered_per_second, one_peer, one.send, payload))
        try:
            ours, reference, ours_all, reference_all = alternate(
                lambda: four_rate(count) * _BIG / 1e6,
                lambda: one_rate(count) * _BIG / 1e6,
                rounds=rounds,
            )
            ratio = paired_ratio(ours_all, reference_all)
        except MeasurementFailed as exc:
            failure = str(exc)
    notes = f"{count} x 16 MiB per measurement, {rounds} rounds"
    if failure is not None:
        notes += f"; FAILED: {failure}"
    return Result(
        scenario="8. e2e 4 streams vs 1, 16 MiB (4 MiB chunks)",
        metric="delivered MB/s",
        ours=ours,
        reference=reference if failure is None else None,
        unit=" MB/s",
        target=">= 1.3x 1 stream",
        met=ratio is not None and ratio >= 1.3,
        paired_ratio=ratio,
        notes=notes,
    )


def _no_stall(quick: bool) -> Result:
    count = 100 if quick else 1000
    # 1,000 x 16 MiB is 17 GB: 300 s allows for a receiver as slow as 56 MB/s; a stall
    # (no delivery for _STALL_AFTER) ends it sooner.
    timeout = _MEASURE_TIMEOUT if quick else 300.0
    payload = os.urandom(_BIG)
    rate, failure = 0.0, None
    with ExitStack() as stack:
        peer = stack.enter_context(Peer("dwcp", max_message_size=_BIG_LIMIT))
        transport = stack.enter_context(_big_transport(peer, 4))
        try:
            rate = delivered_per_second(peer, transport.send, payload, count, timeout=timeout)
        except MeasurementFailed as exc:
            failure = str(exc)
    notes = "quick mode: 100 messages, not 1,000" if quick else f"deadline {timeout:g} s"
    if failure is not None:
        notes += f"; FAILED: {failure}"
    return Result(
        scenario=f"8. e2e {count:,} x 16 MiB on 4 streams, no stall",
        metric="delivered MB/s",
        ours=rate * _BIG / 1e6,
        reference=None,
        unit=" MB/s",
        target=f"all {count:,} delivered",
        met=failure is None,
        notes=notes,
    )


# -- row 3: 32 threads through one transport ---------------------------------------------------------

_THREADS = 32
_THREAD_MESSAGE = 8 * 2**20
_THREAD_SEND_TIMEOUT = 10.0


def threads(quick: bool) -> list[Result]:
    """32 threads x k messages of 8 MiB through one 4-stream transport: every send must
    return or raise within send_timeout (+10 %), and every send that returned must be
    delivered, exactly once.

    Met only if, besides, every send *returned*: on loopback, with seconds to spare, a
    send that raises means a stall (a receiver that stopped reading times every sender out
    at send_timeout, which is bounded and delivers nothing, and must not read as a pass)."""
    per_thread = 4 if quick else 8
    total = _THREADS * per_thread
    bound = _THREAD_SEND_TIMEOUT * 1.1
    payload = os.urandom(_THREAD_MESSAGE)
    barrier = threading.Barrier(_THREADS + 1)
    in_flight: list[float | None] = [None] * _THREADS  # when each thread's current send began
    outcomes: list[tuple[float, BaseException | None]] = []  # (duration, error) per send
    problems: list[str] = []
    delivered = 0
    with ExitStack() as stack:
        peer = stack.enter_context(Peer("dwcp", max_message_size=2 * _THREAD_MESSAGE))
        transport = stack.enter_context(
            _dwcp_transport(
                peer.address,
                streams=4,
                max_message_size=2 * _THREAD_MESSAGE,
                send_timeout=_THREAD_SEND_TIMEOUT,
            )
        )

        def worker(index: int) -> None:
            barrier.wait(_START_TIMEOUT)
            for _ in range(per_thread):
                began = in_flight[index] = time.monotonic()
                error: BaseException | None = None
                try:
                    transport.send(payload)
                except Exception as exc:  # noqa: BLE001 - counted and reported, not a crash
                    error = exc
                in_flight[index] = None
                outcomes.append((time.monotonic() - began, error))  # list.append is atomic

        base = peer.count()
        workers = [
            # Daemon threads: a send blocked for good must not keep the benchmark alive.
            threading.Thread(target=worker, args=(i,), name=f"bench-e2e-{i}", daemon=True)
            for i in range(_THREADS)
        ]
        for thread in workers:
            thread.start()
        barrier.wait(_START_TIMEOUT)
        began = time.monotonic()
        # Wait for the senders, but stop waiting as soon as one send is past its bound: that
        # is already the failure this row looks for, and it may never return.
        hard_deadline = began + per_thread * bound + 30.0
        stuck = 0
        while any(thread.is_alive() for thread in workers):
            now = time.monotonic()
            stuck = sum(1 for t in in_flight if t is not None and now - t > bound)
            if stuck or now > hard_deadline:
                break
            time.sleep(0.05)
        sending = sum(1 for t in in_flight if t is not None)
        returned = sum(1 for _, error in outcomes if error is None)
        raised = [error for _, error in outcomes if error is not None]
        late = sum(1 for duration, _ in outcomes if duration > bound)
        try:
            peer.wait_for(
                base + returned,
                base=base,
                deadline=time.monotonic() + _MEASURE_TIMEOUT,
                stall=_STALL_AFTER,
            )
            elapsed = time.monotonic() - began
        except MeasurementFailed as exc:
            problems.append(f"delivery: {exc}")
            elapsed = 0.0
        # Then let the child drain whatever else is in flight: a message delivered without
        # its send having returned would show here as delivered > returned.
        try:
            delivered = peer.settle() - base
        except MeasurementFailed as exc:
            problems.append(f"drain: {exc}")
    if stuck or sending:
        problems.insert(0, f"{sending} sends still blocked ({stuck} past {bound:g} s)")
    if raised:
        problems.append(f"first error: {raised[0]!r}")
    bounded = not stuck and not sending and late == 0
    slowest = max((duration for duration, _ in outcomes), default=0.0)
    rate = ""
    if returned and elapsed:
        rate = f"; {returned * _THREAD_MESSAGE / elapsed / 1e6:,.0f} MB/s delivered"
    notes = (
        f"{total} sends: {returned} returned, {len(raised)} raised, {late} over {bound:g} s; "
        f"slowest {slowest:.2f} s{rate}"
    )
    if problems:
        notes += "; " + "; ".join(problems)
    return [
        Result(
            scenario=f"8. e2e {_THREADS} threads x {per_thread} x 8 MiB, one 4-stream transport",
            metric="delivered / sends returned",
            ours=delivered,
            reference=returned,
            target=f"all {total} return <= {bound:g} s, delivered == returned",
            met=bounded and returned == total and delivered == returned,
            notes=notes,
            extra={"sends": total, "returned": returned, "raised": len(raised), "late": late},
        )
    ]


# -- row 4: acknowledged (pipelined, windowed) vs unacknowledged ------------------------------------

# (size, sender threads, target ratio, messages per measurement in full and quick mode)
_ACKED_ROWS = (
    (1024, 1, 0.5, 100_000, 30_000),
    (2**20, 1, 0.9, 1_000, 300),
    (1024, 8, 0.8, 100_000, 30_000),
)


def _threaded_rate(peer: Peer, send: Send, payload: bytes, count: int, workers: int) -> float:
    """``delivered_per_second`` with ``workers`` threads sharing ``count`` sends."""
    if workers == 1:
        return delivered_per_second(peer, send, payload, count)
    base = peer.count()
    share = count // workers
    barrier = threading.Barrier(workers + 1)
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait(_START_TIMEOUT)
        try:
            for _ in range(share):
                send(payload)
        except Exception as exc:  # noqa: BLE001 - reported as the measurement's failure
            errors.append(exc)

    pool = [
        threading.Thread(target=work, name=f"bench-acked-{i}", daemon=True) for i in range(workers)
    ]
    for thread in pool:
        thread.start()
    barrier.wait(_START_TIMEOUT)
    began = time.perf_counter()
    deadline = time.monotonic() + _MEASURE_TIMEOUT
    for thread in pool:
        thread.join(max(deadline - time.monotonic(), 0.0))
    if errors:
        raise MeasurementFailed(f"a send raised {errors[0]!r}")
    if any(thread.is_alive() for thread in pool):
        raise MeasurementFailed(f"sends unfinished after {_MEASURE_TIMEOUT:g} s")
    peer.wait_for(base + share * workers, base=base, deadline=deadline, stall=_STALL_AFTER)
    return share * workers / (time.perf_counter() - began)


def acknowledged(quick: bool, only: set[int] | None = None) -> list[Result]:
    """Acknowledged (pipelined ACKs, the default window) against unacknowledged sends, both
    through a default 4-stream transport to the same receiver process, in alternating
    rounds; delivered messages per second, counted by the receiver."""
    rounds = 3 if quick else 7
    results = []
    for row, (size, workers, target, full, short) in enumerate(_ACKED_ROWS):
        if only is not None and row not in only:
            continue
        count = short if quick else full
        payload = os.urandom(size)
        limit = max(4 * size, 2**20)
        failure = None
        samples: dict[str, list[float]] = {}
        with ExitStack() as stack:
            peer = stack.enter_context(Peer("dwcp", max_message_size=limit))
            contenders: dict[str, Callable[[int], float]] = {}
            for name, acked in (("unacked", False), ("acked", True)):
                transport = stack.enter_context(
                    _dwcp_transport(
                        peer.address, max_message_size=limit, acknowledged=acked, send_timeout=30.0
                    )
                )
                contenders[name] = _labelled(
                    name,
                    partial(_threaded_rate, peer, transport.send, payload, workers=workers),
                )
            samples, failure = rotate(
                contenders, count=count, rounds=rounds, warmup=max(1, count // 4)
            )
        ours, reference = samples["acked"], samples["unacked"]
        ratio = paired_ratio(ours, reference) if ours else None
        notes = f"{count:,} msgs x {len(ours)} rounds; 4 streams, default window"
        if ours:
            notes += _per_round(ours, reference)
        if failure is not None:
            notes += f"; FAILED: {failure}"
        results.append(
            Result(
                scenario=(
                    f"8. e2e acknowledged vs not, {_size(size)}, {workers} sender "
                    f"thread{'s' if workers > 1 else ''}"
                ),
                metric="delivered msgs/s",
                ours=_median(ours) / 1e3,
                reference=_median(reference) / 1e3,
                unit=" kmsg/s",
                target=f">= {target}x unacknowledged",
                met=failure is None and ratio is not None and ratio >= target,
                paired_ratio=ratio,
                notes=notes,
                extra={"message_size": size, "threads": workers},
            )
        )
    return results


# -- row 5: many sender threads on one link --------------------------------------------------------

_SENDERS = 8
_SENDERS_COUNT = (100_000, 30_000)  # messages per measurement, full and quick


def many_senders(quick: bool) -> list[Result]:
    """8 threads sending 1 KiB messages over one link, against what they would write by hand:
    a 4-byte length prefix on one connection, each ``sendall`` under a lock (the threads
    share it). Also the same dwcp transport sent to from one thread: what the threads cost.
    """
    rounds = 3 if quick else 7
    count = _SENDERS_COUNT[1] if quick else _SENDERS_COUNT[0]
    size = 1024
    payload = os.urandom(size)
    limit = 2**20
    with ExitStack() as stack:
        framed_peer = stack.enter_context(Peer("framed", max_message_size=limit))
        framed = framed_sender(stack.enter_context(_tcp_connection(framed_peer.address)))
        lock = threading.Lock()

        def locked(data: bytes) -> None:
            with lock:
                framed(data)

        dwcp_peer = stack.enter_context(Peer("dwcp", max_message_size=limit))
        unacked = stack.enter_context(_dwcp_transport(dwcp_peer.address, max_message_size=limit))
        acked = stack.enter_context(
            _dwcp_transport(dwcp_peer.address, max_message_size=limit, acknowledged=True)
        )
        contenders = {
            "framed": partial(_threaded_rate, framed_peer, locked, payload, workers=_SENDERS),
            "dwcp": partial(_threaded_rate, dwcp_peer, unacked.send, payload, workers=_SENDERS),
            "dwcp-acked": partial(_threaded_rate, dwcp_peer, acked.send, payload, workers=_SENDERS),
            "dwcp-1": partial(_threaded_rate, dwcp_peer, unacked.send, payload, workers=1),
        }
        labelled = {name: _labelled(name, measure) for name, measure in contenders.items()}
        samples, failure = rotate(labelled, count=count, rounds=rounds, warmup=count // 4)
    notes = f"{count:,} msgs x {len(samples['dwcp'])} rounds; default 4-stream transports"
    if failure is not None:
        notes += f"; FAILED: {failure}"
    results = []
    rows = (
        ("dwcp", "framed", "length prefix under a lock, 8 threads", 1.0),
        ("dwcp-acked", "framed", "length prefix under a lock, 8 threads", 0.8),
        ("dwcp", "dwcp-1", "dwcp from one thread", 0.8),
    )
    for ours_name, reference_name, title, target in rows:
        ours, reference = samples[ours_name], samples[reference_name]
        ratio = paired_ratio(ours, reference) if ours else None
        kind = "acknowledged" if ours_name == "dwcp-acked" else "unacknowledged"
        results.append(
            Result(
                scenario=f"8. e2e {_SENDERS} sender threads, 1 KiB, {kind}, vs {title}",
                metric="delivered msgs/s",
                ours=_median(ours) / 1e3,
                reference=_median(reference) / 1e3,
                unit=" kmsg/s",
                target=f">= {target}x",
                met=failure is None and ratio is not None and ratio >= target,
                paired_ratio=ratio,
                notes=notes + _per_round(ours, reference),
                extra={"message_size": size, "threads": _SENDERS, "reference": reference_name},
            )
        )
    return results


# -- the scenario ----------------------------------------------------------------------------------


def end_to_end(quick: bool) -> list[Result]:
    """Scenario 8: delivered messages per second, receiver in a child process."""
    from benchmarks import e2e_compare

    rows, lat = e2e_compare.run(quick)
    print(e2e_compare.markdown(rows, lat))
    return (
        e2e_compare.results(rows, lat)
        + multistream(quick)
        + threads(quick)
        + acknowledged(quick)
        + many_senders(quick)
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.e2e``: the comparison rows (``benchmarks/e2e_compare.py``)."""
    import argparse
    import platform

    from benchmarks import e2e_compare
    from benchmarks.harness import format_table

    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.e2e",
        description="dwcp end to end against a hand-framed socket and pyzmq, at defaults, "
        "unpinned, each receiver in its own process (benchmarks/README.md).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer messages and 3 rounds (a smoke test)"
    )
    parser.add_argument(
        "--sizes",
        nargs="*",
        type=int,
        choices=[size for size, _, _ in e2e_compare.SIZES],
        help="message sizes of the throughput rows (default: all)",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the latency rows")
    parser.add_argument(
        "--acked",
        nargs="*",
        type=int,
        choices=range(len(_ACKED_ROWS)),
        help="instead, the acknowledged-vs-not rows (all, or those numbered)",
    )
    parser.add_argument("--senders", action="store_true", help="instead, the 8-sender-thread rows")
    args = parser.parse_args(argv)
    if args.acked is not None or args.senders:
        found = [] if args.acked is None else acknowledged(args.quick, set(args.acked) or None)
        if args.senders:
            found += many_senders(args.quick)
        print(format_table(found))
        for row in found:
            print(f"  {row.scenario}: {row.notes}")
        return 0 if all(row.met for row in found) else 1
    load = os.getloadavg()
    began = time.monotonic()
    rows, lat = e2e_compare.run(
        args.quick,
        sizes=tuple(args.sizes) if args.sizes else None,
        with_latency=not args.no_latency,
    )
    print(e2e_compare.markdown(rows, lat))
    after = os.getloadavg()
    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {after[0]:.2f} {after[1]:.2f} "
        f"{after[2]:.2f}; took {time.monotonic() - began:.0f} s"
        + ("; QUICK mode" if args.quick else "")
    )
    problems = e2e_compare.failures(rows, lat)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

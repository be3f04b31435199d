"""dwcp against what a user would write instead, as a user runs it (issue 22, point 4).

Throughput rows: 1 KiB, 64 KiB and 1 MiB messages, delivered messages per second counted
where they arrive, each receiver in a child process of its own (``benchmarks/e2e_peer.py``),
the sender in this process.  Contenders, at their defaults:

- ``hand-framed``: a 4-byte big-endian length prefix on a default socket (Nagle on): one
  ``sendall`` of prefix + payload per message, a two-part ``sendmsg`` above 16 KiB; the
  receiver parses whole frames out of a ``recv_into`` buffer;
- ``pyzmq``: PUSH/PULL with pyzmq's defaults (high-water marks 1000, ``send()`` copying);
- ``dwcp``: ``Manager.send_with_circuit_breaker`` of a default ``Manager`` over a
  ``MultiStreamTCPTransport`` with defaults but ``streams`` (1 and 4) and ``checksum`` (on and
  off), to a default ``MultiStreamReceiver`` whose ``on_message`` counts.

Nothing is pinned to a core.  Each measurement is timed from the first send until the
receiver has counted all N messages, and charges both processes their CPU seconds (every
thread: pyzmq's I/O threads and dwcp's writer and reader threads included) per GB of payload.
After one warm-up pass, every round runs every contender once, who goes first rotating, and a
ratio is the median of the per-round ratios.

Latency rows (1 KiB): ``transport.send(wait=True)`` of an acknowledged transport (the Manager
has no ``wait``), and ``send_with_circuit_breaker`` then ``transport.flush()`` of another, one
message at a time, against a hand-written request/ack (one ``sendall`` of prefix + payload,
read one byte back) and pyzmq REQ/REP.  Each round gives each its p50 over N messages.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

from benchmarks import e2e
from benchmarks.e2e import MeasurementFailed, Peer, Send
from benchmarks.harness import Result
from dwcp import Manager
from dwcp.transport import MultiStreamTCPTransport

GB = 1e9
LATENCY_SIZE = 1024
# (size, messages per measurement in full and quick mode): about half a second to a second per
# measurement for the slowest contender on a busy 2-core machine.
SIZES = ((1024, 100_000, 20_000), (64 * 1024, 10_000, 2_000), (2**20, 1_000, 200))
LATENCY_COUNT = (2_000, 400)
ROUNDS = (7, 3)

FRAMED = "hand-framed"
PYZMQ = "pyzmq"
# Context, not a target: pyzmq with copy=False, which its documentation suggests for large
# messages; a user who knows it gets this, so the table shows it beside the default.
PYZMQ_NOCOPY = "pyzmq copy=False"
FRAMED_SETTINGS = (
    "default socket options (Nagle on); one sendall(prefix + payload) per message, "
    "sendmsg((prefix, payload)) above 16 KiB; receiver: recv_into + parse"
)
PYZMQ_SETTINGS = "PUSH/PULL, pyzmq defaults (HWM 1000, send(data) copying, 1 I/O thread)"
PYZMQ_NOCOPY_SETTINGS = "as pyzmq, but send(data, copy=False) (no copy above 64 KiB)"


@dataclass
class Sample:
    """One measurement: delivered messages per second, and each process's CPU s/GB."""

    rate: float
    sender_cpu: float
    receiver_cpu: float

    @property
    def cpu(self) -> float:
        return self.sender_cpu + self.receiver_cpu


@dataclass
class Variant:
    """A dwcp configuration of the throughput rows."""

    streams: int
    checksum: bool

    @property
    def name(self) -> str:
        return f"dwcp {self.streams} stream{'s' if self.streams > 1 else ''}, " + (
            "checksum on" if self.checksum else "checksum off"
        )

    @property
    def settings(self) -> str:
        return (
            f"Manager() defaults, send_with_circuit_breaker; streams={self.streams}, "
            f"checksum={self.checksum}; defaults: chunk_size {self.chunking}, unacknowledged"
        )

    @property
    def chunking(self) -> str:
        """What the default ``chunk_size`` does with this many streams."""
        return "262144" if self.streams > 1 else "None (one stream: each message whole)"


VARIANTS = (Variant(1, True), Variant(1, False), Variant(4, True), Variant(4, False))


@dataclass
class SizeRow:
    """Everything measured at one message size."""

    size: int
    count: int
    rounds: int
    samples: dict[str, list[Sample]]
    failure: str | None = None
    notes: list[str] = field(default_factory=list)

    def ratio(self, ours: str, reference: str) -> float | None:
        a, b = self.samples.get(ours), self.samples.get(reference)
        if not a or not b:
            return None
        return statistics.median(x.rate / y.rate for x, y in zip(a, b))

    def cpu_ratio(self, ours: str, reference: str) -> float | None:
        a, b = self.samples.get(ours), self.samples.get(reference)
        if not a or not b:
            return None
        return statistics.median(x.cpu / y.cpu for x, y in zip(a, b))

    def median(self, name: str, what: Callable[[Sample], float]) -> float | None:
        got = self.samples.get(name)
        return statistics.median(what(s) for s in got) if got else None


def measure(peer: Peer, send: Send, payload: bytes, count: int) -> Sample:
    """``count`` sends of ``payload``, timed until ``peer`` has counted them all, with the
    CPU both processes used meanwhile."""
    base = peer.count()
    receiver_before = peer.cpu
    batch = max(1, min(1024, 2**20 // max(len(payload), 1)))
    cpu_before = time.process_time()
    began = time.perf_counter()
    deadline = time.monotonic() + e2e._MEASURE_TIMEOUT
    sent = 0
    try:
        while sent < count:
            n = min(batch, count - sent)
            for _ in range(n):
                send(payload)
            sent += n
            if time.monotonic() > deadline:
                raise MeasurementFailed(f"sends unfinished after {e2e._MEASURE_TIMEOUT:g} s")
    except MeasurementFailed:
        raise
    except Exception as exc:  # TransportError, CircuitOpenError, OSError, zmq.Again alike
        raise MeasurementFailed(f"a send after {sent:,} of {count:,} raised {exc!r}") from exc
    peer.wait_for(base + count, base=base, deadline=deadline, stall=e2e._STALL_AFTER)
    elapsed = time.perf_counter() - began
    sender_cpu = time.process_time() - cpu_before
    gigabytes = count * len(payload) / GB
    return Sample(
        rate=count / elapsed,
        sender_cpu=sender_cpu / gigabytes,
        receiver_cpu=(peer.cpu - receiver_before) / gigabytes,
    )


@contextmanager
def managed(transport: MultiStreamTCPTransport) -> Iterator[Manager]:
    """A default ``Manager`` over ``transport``, started; stopped (with the transport) after."""
    manager = Manager(transport)
    manager.start()
    try:
        yield manager
    finally:
        if not e2e._close_within(manager.stop, e2e._CLOSE_TIMEOUT):
            print(f"(manager stop() still blocked after {e2e._CLOSE_TIMEOUT:g} s)", file=sys.stderr)


def throughput_at(size: int, count: int, rounds: int) -> SizeRow:
    payload = os.urandom(size)
    contenders: dict[str, Callable[[int], Sample]] = {}
    notes = []
    with ExitStack() as stack:
        # Each peer is entered before its sender, so the sender is closed first on the way out.
        framed_peer = stack.enter_context(Peer("framed"))
        framed = e2e.framed_sender(stack.enter_context(e2e._tcp_connection(framed_peer.address)))
        contenders[FRAMED] = partial(measure, framed_peer, framed, payload)
        if e2e.HAVE_ZMQ:
            zmq_peer = stack.enter_context(Peer("zmq"))
            push = stack.enter_context(e2e._zmq_sender(zmq_peer.port))
            contenders[PYZMQ] = partial(measure, zmq_peer, push, payload)
            if size > 64 * 1024:  # below zmq.COPY_THRESHOLD copy=False copies all the same
                nocopy_peer = stack.enter_context(Peer("zmq"))
                nocopy = stack.enter_context(e2e._zmq_sender(nocopy_peer.port, copy=False))
                contenders[PYZMQ_NOCOPY] = partial(measure, nocopy_peer, nocopy, payload)
        else:
            notes.append("pyzmq not installed: its reference skipped (pip install '.[bench]')")
        for variant in VARIANTS:
            peer = stack.enter_context(Peer("dwcp"))
            transport = MultiStreamTCPTransport(
                peer.address, streams=variant.streams, checksum=variant.checksum
            )
            manager = stack.enter_context(managed(transport))
            contenders[variant.name] = partial(
                measure, peer, manager.send_with_circuit_breaker, payload
            )
        labelled = {name: e2e._labelled(name, run) for name, run in contenders.items()}
        samples, failure = e2e.rotate(
            labelled, count=count, rounds=rounds, warmup=max(1, count // 4)
        )
    return SizeRow(size, count, rounds, samples, failure, notes)


# -- latency ----------------------------------------------------------------------------------------


def _p50(one: Callable[[], object], count: int) -> float:
    """Median seconds of ``count`` calls of ``one``, each timed on its own."""
    times = []
    clock = time.perf_counter
    deadline = time.monotonic() + e2e._MEASURE_TIMEOUT
    try:
        for i in range(count):
            began = clock()
            one()
            times.append(clock() - began)
            if not i % 256 and time.monotonic() > deadline:
                raise MeasurementFailed(f"unfinished after {e2e._MEASURE_TIMEOUT:g} s")
    except MeasurementFailed:
        raise
    except Exception as exc:  # any failure of a round trip fails the row
        raise MeasurementFailed(f"call {len(times) + 1:,} raised {exc!r}") from exc
    return statistics.median(times)


def _request_ack(address: tuple[str, int], stack: ExitStack, payload: bytes) -> Callable[[], None]:
    sock = stack.enter_context(e2e._tcp_connection(address))
    prefix = e2e._LENGTH.pack(len(payload))
    sendall, recv = sock.sendall, sock.recv

    def one() -> None:
        sendall(prefix + payload)
        if not recv(1):
            raise MeasurementFailed("the request/ack server closed the connection")

    return one


def _zmq_req(port: int, stack: ExitStack, payload: bytes) -> Callable[[], None]:
    import zmq

    context = zmq.Context()
    req = context.socket(zmq.REQ)  # pyzmq's defaults, but a receive timeout against a hang
    req.setsockopt(zmq.RCVTIMEO, int(e2e._MEASURE_TIMEOUT * 1000))
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"tcp://127.0.0.1:{port}")

    def close() -> None:
        req.close(linger=0)
        context.term()

    stack.callback(close)
    send, recv = req.send, req.recv

    def one() -> None:
        send(payload)
        recv()

    return one


LATENCY_ROWS = {
    "hand request/ack": (
        "default socket options; sendall(prefix + payload), recv one byte back; "
        "server: MSG_WAITALL reads, sendall(1 byte)"
    ),
    "pyzmq REQ/REP": "REQ/REP, pyzmq defaults; REP answers 1 byte",
    "dwcp send(wait=True)": (
        "transport.send(data, wait=True) (Manager has no wait); MultiStreamTCPTransport("
        "acknowledged=True), other options default (4 streams, checksum on); receiver defaults"
    ),
    "dwcp send()+flush()": (
        "Manager.send_with_circuit_breaker(data) then transport.flush(), one message at a "
        "time; MultiStreamTCPTransport(acknowledged=True), other options default"
    ),
}


@dataclass
class LatencyRow:
    count: int
    rounds: int
    samples: dict[str, list[float]]
    failure: str | None = None

    def ratio(self, ours: str, reference: str) -> float | None:
        a, b = self.samples.get(ours), self.samples.get(reference)
        if not a or not b:
            return None
        return statistics.median(x / y for x, y in zip(a, b))


def latency(count: int, rounds: int) -> LatencyRow:
    payload = os.urandom(LATENCY_SIZE)
    calls: dict[str, Callable[[], object]] = {}
    with ExitStack() as stack:
        peer = stack.enter_context(Peer("reqack"))
        calls["hand request/ack"] = _request_ack(peer.address, stack, payload)
        if e2e.HAVE_ZMQ:
            rep = stack.enter_context(Peer("zmq-rep"))
            calls["pyzmq REQ/REP"] = _zmq_req(rep.port, stack, payload)
        waiting_peer = stack.enter_context(Peer("dwcp"))
        waiting = MultiStreamTCPTransport(waiting_peer.address, acknowledged=True)
        stack.enter_context(managed(waiting))
        calls["dwcp send(wait=True)"] = partial(waiting.send, payload, wait=True)
        flushing_peer = stack.enter_context(Peer("dwcp"))
        flushing = MultiStreamTCPTransport(flushing_peer.address, acknowledged=True)
        flushing_manager = stack.enter_context(managed(flushing))
        guarded_send, flush = flushing_manager.send_with_circuit_breaker, flushing.flush

        def send_then_flush() -> None:
            guarded_send(payload)
            flush()

        calls["dwcp send()+flush()"] = send_then_flush
        contenders = {
            name: e2e._labelled(name, partial(_p50, call)) for name, call in calls.items()
        }
        samples, failure = e2e.rotate(
            contenders, count=count, rounds=rounds, warmup=max(1, count // 4)
        )
    return LatencyRow(count, rounds, samples, failure)


# -- targets and the table ------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate(size: int, rate: float | None) -> str:
    if rate is None:
        return "-"
    if size >= 2**20:
        return f"{rate * size / 1e9:.2f} GB/s"
    return f"{rate / 1e3:,.1f}k msg/s"


def _target(row: SizeRow, variant: Variant) -> tuple[str, bool | None]:
    """Issue 22's target for this row and whether the paired medians meet it."""
    name = variant.name
    framed, zmq = row.ratio(name, FRAMED), row.ratio(name, PYZMQ)
    if row.size == 1024:
        cpu = row.cpu_ratio(name, PYZMQ)
        text = ">= 1.0x pyzmq and hand-framed, CPU/GB <= 1.2x pyzmq's"
        if framed is None or zmq is None or cpu is None:
            return text, None
        return text, framed >= 1.0 and zmq >= 1.0 and cpu <= 1.2
    if row.size == 64 * 1024:
        return ">= 1.0x hand-framed", None if framed is None else framed >= 1.0
    bound = 0.8 if variant.checksum else 1.0
    text = f">= {bound}x pyzmq and hand-framed"
    if framed is None or zmq is None:
        return text, None
    return text, framed >= bound and zmq >= bound


def _nocopy_verdict(row: SizeRow, variant: Variant) -> str:
    """At 1 MiB, the same target against pyzmq with copy=False: context, not the target."""
    nocopy = row.ratio(variant.name, PYZMQ_NOCOPY)
    if row.size < 2**20 or nocopy is None:
        return ""
    bound = 0.8 if variant.checksum else 1.0
    return f" (against copy=False: {'yes' if nocopy >= bound else 'no'})"


def _met(value: bool | None) -> str:
    return "not measured" if value is None else ("yes" if value else "**no**")


def markdown(rows: list[SizeRow], lat: LatencyRow | None) -> str:
    """The README's table: settings beside every row, CPU of both processes beside ratios."""
    out = [
        (
            "| size | sender | settings | msgs x rounds | delivered (median) | vs hand-framed "
            "| vs pyzmq | CPU s/GB sender / receiver | target | met |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = e2e._size(row.size)
        runs = f"{row.count:,} x {min((len(s) for s in row.samples.values()), default=0)}"
        references = (
            (FRAMED, FRAMED_SETTINGS),
            (PYZMQ, PYZMQ_SETTINGS),
            (PYZMQ_NOCOPY, PYZMQ_NOCOPY_SETTINGS),
        )
        for name, settings in references:
            if name not in row.samples:
                continue
            out.append(
                f"| {size} | {name} | {settings} | {runs} | "
                f"{_rate(row.size, row.median(name, lambda s: s.rate))} | "
                f"{_x(row.ratio(name, FRAMED))} | {_x(row.ratio(name, PYZMQ))} | "
                f"{_num(row.median(name, lambda s: s.sender_cpu))} / "
                f"{_num(row.median(name, lambda s: s.receiver_cpu))} | | |"
            )
        for variant in VARIANTS:
            name = variant.name
            target, met = _target(row, variant)
            cpu = row.cpu_ratio(name, PYZMQ)
            cpu_note = "" if cpu is None else f" ({cpu:.2f}x pyzmq's)"
            nocopy = row.ratio(name, PYZMQ_NOCOPY)
            zmq_cell = _x(row.ratio(name, PYZMQ))
            if nocopy is not None:
                zmq_cell += f" ({_x(nocopy)} copy=False)"
            out.append(
                f"| {size} | {name} | {variant.settings} | {runs} | "
                f"{_rate(row.size, row.median(name, lambda s: s.rate))} | "
                f"{_x(row.ratio(name, FRAMED))} | {zmq_cell} | "
                f"{_num(row.median(name, lambda s: s.sender_cpu))} / "
                f"{_num(row.median(name, lambda s: s.receiver_cpu))}{cpu_note} | "
                f"{target} | {_met(met)}{_nocopy_verdict(row, variant)} |"
            )
        for checksum in (True, False):
            four, one = Variant(4, checksum).name, Variant(1, checksum).name
            ratio = row.ratio(four, one)
            out.append(
                f"| {size} | 4 streams vs 1, checksum {'on' if checksum else 'off'} | as above "
                f"| {runs} | | {_x(ratio)} of 1 stream | | | >= 1.0x (never slower) "
                f"| {_met(None if ratio is None else ratio >= 1.0)} |"
            )
    if lat is not None:
        out.append("")
        out.append(
            "| 1 KiB, one at a time | settings | msgs x rounds | p50 (median of rounds) "
            "| ratio | target | met |"
        )
        out.append("|---|---|---|---|---|---|---|")
        runs = f"{lat.count:,} x {min((len(s) for s in lat.samples.values()), default=0)}"
        checks = {
            "dwcp send(wait=True)": ("hand request/ack", 2.0, "<= 2.0x hand request/ack"),
            "dwcp send()+flush()": ("dwcp send(wait=True)", 1.0, "<= 1.0x send(wait=True)"),
        }
        for name, settings in LATENCY_ROWS.items():
            got = lat.samples.get(name)
            p50 = f"{statistics.median(got) * 1e6:,.0f} us" if got else "-"
            ratio_text = target = verdict = ""
            if name in checks:
                reference, bound, target = checks[name]
                ratio = lat.ratio(name, reference)
                ratio_text = f"{_x(ratio)} {reference}"
                if name == "dwcp send(wait=True)":
                    ratio_text += f"; {_x(lat.ratio(name, 'pyzmq REQ/REP'))} pyzmq REQ/REP"
                verdict = _met(None if ratio is None else ratio <= bound)
            out.append(
                f"| {name} | {settings} | {runs} | {p50} | {ratio_text} | {target} | {verdict} |"
            )
    return "\n".join(out)


def results(rows: list[SizeRow], lat: LatencyRow | None) -> list[Result]:
    """The same rows as ``harness.Result`` for ``python -m benchmarks --only 8``."""
    found: list[Result] = []
    for row in rows:
        base = f"{row.count:,} msgs x {row.rounds} rounds"
        if row.failure:
            base += f"; FAILED: {row.failure}"
        for variant in VARIANTS:
            name = variant.name
            target, met = _target(row, variant)
            rate = row.median(name, lambda s: s.rate)
            framed_rate = row.median(FRAMED, lambda s: s.rate)
            notes = (
                f"{base}; {variant.settings}; vs pyzmq {_x(row.ratio(name, PYZMQ))}; "
                f"CPU s/GB sender/receiver dwcp {_num(row.median(name, lambda s: s.sender_cpu))}"
                f"/{_num(row.median(name, lambda s: s.receiver_cpu))}, hand-framed "
                f"{_num(row.median(FRAMED, lambda s: s.sender_cpu))}/"
                f"{_num(row.median(FRAMED, lambda s: s.receiver_cpu))}, pyzmq "
                f"{_num(row.median(PYZMQ, lambda s: s.sender_cpu))}/"
                f"{_num(row.median(PYZMQ, lambda s: s.receiver_cpu))}"
            )
            found.append(
                Result(
                    scenario=f"8. e2e {e2e._size(row.size)}, {name}, vs hand-framed",
                    metric="delivered msgs/s",
                    ours=(rate or 0.0) / 1e3,
                    reference=None if framed_rate is None else framed_rate / 1e3,
                    unit=" kmsg/s",
                    target=target,
                    met=bool(met) and row.failure is None,
                    paired_ratio=row.ratio(name, FRAMED),
                    notes="; ".join([notes, *row.notes]),
                    extra={"message_size": row.size, "streams": variant.streams},
                )
            )
    if lat is not None:
        for name, reference, bound in (
            ("dwcp send(wait=True)", "hand request/ack", 2.0),
            ("dwcp send()+flush()", "dwcp send(wait=True)", 1.0),
        ):
            ours, theirs = lat.samples.get(name), lat.samples.get(reference)
            ratio = lat.ratio(name, reference)
            found.append(
                Result(
                    scenario=f"8. e2e latency p50, 1 KiB, {name} vs {reference}",
                    metric="p50",
                    ours=statistics.median(ours) * 1e6 if ours else 0.0,
                    reference=statistics.median(theirs) * 1e6 if theirs else None,
                    unit=" us",
                    target=f"<= {bound}x",
                    met=ratio is not None and ratio <= bound and lat.failure is None,
                    paired_ratio=ratio,
                    notes=f"{lat.count:,} msgs x {lat.rounds} rounds"
                    + (f"; FAILED: {lat.failure}" if lat.failure else ""),
                )
            )
    return found


def run(
    quick: bool, *, sizes: tuple[int, ...] | None = None, with_latency: bool = True
) -> tuple[list[SizeRow], LatencyRow | None]:
    rounds = ROUNDS[1] if quick else ROUNDS[0]
    rows = []
    for size, full, short in SIZES:
        if sizes is not None and size not in sizes:
            continue
        print(f"e2e: {e2e._size(size)} ...", file=sys.stderr, flush=True)
        rows.append(throughput_at(size, short if quick else full, rounds))
    lat = None
    if with_latency:
        print("e2e: latency ...", file=sys.stderr, flush=True)
        lat = latency(LATENCY_COUNT[1] if quick else LATENCY_COUNT[0], rounds)
    return rows, lat


def failures(rows: list[SizeRow], lat: LatencyRow | None) -> list[str]:
    found = [f"{e2e._size(r.size)}: {r.failure}" for r in rows if r.failure]
    if lat is not None and lat.failure:
        found.append(f"latency: {lat.failure}")
    return found

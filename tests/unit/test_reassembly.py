"""Property tests of ``Reassembly`` without sockets: every interleaving completes, in order.

A generated *plan* is one sender session: S streams, M messages cut into chunks (every chunk
but a message's last carries at least ``wire.MIN_CHUNK_SIZE`` bytes), each chunk assigned to
a stream, and each stream's frames in nondecreasing message-id order (the wire format's rule)
with the chunks of one message in any order. Hypothesis then plays the scheduler: which
stream hands over its next frame(s), when the delivery side takes, and when it calls done.
"""

from __future__ import annotations

import random
import threading
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dwcp.transport import wire
from dwcp.transport._reassembly import (
    ANNOUNCE_COUNT,
    FRAME_OVERHEAD,
    Closed,
    Ready,
    Reassembly,
)
from dwcp.transport.wire import ProtocolError
from tests._frames import Frame
from tests.conftest import wait_until

MIN = wire.MIN_CHUNK_SIZE
LIMIT = wire.DEFAULT_MAX_MESSAGE_SIZE
LAYOUTS = ("striped", "random", "whole-messages", "one-stream")
DEADLINE = 10.0  # real threads: a run not done by then is a stall


# -- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One session as a sender writes it."""

    streams: int
    messages: tuple[bytes, ...]
    frames: tuple[tuple[Frame, ...], ...]  # per stream, in the order the stream carries them
    first_stream: tuple[int, ...]  # the stream carrying chunk 0 of each message (its ACKs)
    costs: tuple[int, ...]  # what each message is charged: its bytes + FRAME_OVERHEAD a chunk

    @property
    def largest_cost(self) -> int:
        return max(self.costs)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints it
        printer.text(repr(self))

    def __repr__(self) -> str:
        lines = [f"Plan(streams={self.streams}, sizes={[len(m) for m in self.messages]})"]
        for stream, frames in enumerate(self.frames):
            cells = " ".join(
                f"{f.message_id}.{f.chunk_index}/{f.chunk_count}({f.length})" for f in frames
            )
            lines.append(f"  stream {stream}: {cells}")
        return "\n".join(lines)


def chunk_lengths(size: int, chunk_size: int, uneven: bool, rng: random.Random) -> list[int]:
    """Cut ``size`` bytes: every chunk but the last >= MIN and <= chunk_size bytes."""
    if not uneven:
        count = wire.chunk_count(size, chunk_size)
        return [chunk_size] * (count - 1) + [size - chunk_size * (count - 1)]
    lengths = []
    rest = size
    while rest > chunk_size:
        length = rng.randint(MIN, chunk_size)
        lengths.append(length)
        rest -= length
    return [*lengths, rest]


def as_payload(data: bytes, rng: random.Random) -> bytes | bytearray | list[bytes | bytearray]:
    """The payload in one of the shapes a reader hands over (bytes, bytearray, pieces)."""
    shape = rng.randrange(3)
    if shape == 0 or not data:
        return data
    if shape == 1:
        return bytearray(data)
    cut = rng.randint(0, len(data))
    return [data[:cut], bytearray(data[cut:])]


def make_plan(
    streams: int, sizes: list[int], chunk_size: int, layout: str, uneven: bool, seed: int
) -> Plan:
    rng = random.Random(seed)
    messages = tuple(rng.randbytes(size) for size in sizes)
    per_stream: list[list[Frame]] = [[] for _ in range(streams)]
    first_stream = []
    costs = []
    for mid, data in enumerate(messages):
        lengths = chunk_lengths(len(data), chunk_size, uneven, rng)
        count = len(lengths)
        groups: dict[int, list[Frame]] = {}
        home = rng.randrange(streams)
        at = 0
        for index, length in enumerate(lengths):
            wire.check_data_fields(0, index, count, len(data), length, 0, LIMIT)  # a legal frame
            payload = as_payload(data[at : at + length], rng)
            at += length
            if layout == "striped":  # round-robin from mid % S, like the sender
                stream = (mid + index) % streams
            elif layout == "random":
                stream = rng.randrange(streams)
            elif layout == "whole-messages":
                stream = home
            else:
                stream = 0
            if index == 0:
                first_stream.append(stream)
            groups.setdefault(stream, []).append(
                Frame(mid, index, count, len(data), payload, length)
            )
        for stream, frames in groups.items():
            if rng.random() < 0.5:
                rng.shuffle(frames)  # chunk order within a message is free
            per_stream[stream].extend(frames)
        costs.append(len(data) + FRAME_OVERHEAD * count)
    return Plan(
        streams,
        messages,
        tuple(tuple(frames) for frames in per_stream),
        tuple(first_stream),
        tuple(costs),
    )


@st.composite
def plans(draw: st.DrawFn, max_messages: int = 40, max_size: int = 20 * 1024) -> Plan:
    streams = draw(st.integers(1, 6))
    count = draw(st.integers(1, max_messages))  # not a plain list: those are mostly short
    size = st.one_of(st.integers(0, 2 * MIN), st.integers(0, max_size))
    sizes = draw(st.lists(size, min_size=count, max_size=count))
    chunk_size = draw(st.one_of(st.just(MIN), st.integers(MIN, 4 * MIN)))
    layout = draw(st.sampled_from(LAYOUTS))
    uneven = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return make_plan(streams, sizes, chunk_size, layout, uneven, seed)


# Small budgets (below one frame: only the next message moves), medium, and "never full".
budgets = st.one_of(st.integers(1, 4096), st.integers(4097, 256 * 1024), st.just(1 << 30))


def joined(ready: Ready) -> bytes:
    """A ready message's bytes: its payload is one bytes-like object or a list of pieces."""
    payload = ready[1]
    if isinstance(payload, list):
        return b"".join(bytes(piece) for piece in payload)
    return bytes(payload)


def ids(batch: list[Ready] | None) -> list[int]:
    assert batch is not None
    return [ready[0] for ready in batch]


def cost(batch: list[Ready] | None) -> int:
    assert batch is not None
    return sum(ready[2] for ready in batch)


def check_delivery(plan: Plan, delivered: list[Ready]) -> None:
    """Every message exactly once, in id order, byte for byte, ACKed on its chunk 0's stream."""
    assert ids(delivered) == list(range(len(plan.messages)))
    for ready in delivered:
        mid, _, charged, ack_stream = ready
        assert joined(ready) == plan.messages[mid], f"message {mid} differs"
        assert charged == plan.costs[mid]
        assert ack_stream == plan.first_stream[mid]


# -- property A: one thread, hypothesis schedules ---------------------------------------------


def drive(plan: Plan, max_buffered: int, data: st.DataObject) -> tuple[Reassembly, list[Ready]]:
    """Run ``plan`` through a Reassembly with hypothesis choosing every next step.

    A stream is *blocked* when its last attempt was refused and nothing changed since; the
    consumer is *idle* when its last take found nothing and no frame was stored since. With
    every stream blocked or finished, the consumer idle and holding nothing, no step can
    change anything: that is a deadlock, and it must only happen once all is delivered.
    """
    streams = plan.streams
    reassembly = Reassembly(streams, max_buffered=max_buffered)
    position = [0] * streams
    reserved: list[Frame | None] = [None] * streams  # admitted by reserve(), not yet stored
    blocked: set[int] = set()
    consumer_idle = False
    held: list[Ready] = []  # taken, not yet done
    delivered: list[Ready] = []
    charged = 0  # the model of ``buffered``: frames admitted minus costs done

    def admitted(frames: tuple[Frame, ...] | list[Frame]) -> None:
        nonlocal charged, consumer_idle
        if frames:
            charged += sum(frame.length + FRAME_OVERHEAD for frame in frames)
            blocked.clear()
            consumer_idle = False

    def refused(stream: int, frame: Frame) -> None:
        # Only over budget: a frame that fits is never refused.
        assert reassembly.buffered + frame.length + FRAME_OVERHEAD > max_buffered
        blocked.add(stream)

    while True:
        actions: list[tuple[str, int]] = [
            ("stream", s)
            for s in range(streams)
            if (position[s] < len(plan.frames[s]) or reserved[s] is not None) and s not in blocked
        ]
        if not consumer_idle:
            actions.append(("take", 0))
        if held:
            actions.append(("done", 0))
        if not actions:
            break
        kind, stream = actions[data.draw(st.integers(0, len(actions) - 1))]
        if kind == "stream":
            frames = plan.frames[stream]
            pending = reserved[stream]
            if pending is not None:  # the reader has read the payload: store it
                reassembly.store(pending)
                reserved[stream] = None
                position[stream] += 1
                consumer_idle = False
                blocked.clear()
            elif (how := data.draw(st.integers(0, 3))) == 0:  # a large frame: reserve first
                frame = frames[position[stream]]
                if reassembly.reserve(stream, frame._replace(payload=b"")):
                    reserved[stream] = frame
                    admitted([frame])
                else:
                    refused(stream, frame)
            else:  # a batch of up to ``how`` parsed frames
                batch = frames[position[stream] : position[stream] + how]
                taken = reassembly.push(stream, batch)
                admitted(batch[:taken])
                position[stream] += taken
                if taken < len(batch):
                    refused(stream, batch[taken])
        elif kind == "take":
            got = reassembly.take(0)
            assert got is not None
            held.extend(got)
            consumer_idle = True
        else:
            count = data.draw(st.integers(1, len(held)))
            done, held = held[:count], held[count:]
            reassembly.done(cost(done))
            charged -= cost(done)
            delivered.extend(done)
            blocked.clear()
        assert reassembly.buffered == charged
        assert 0 <= reassembly.delivering <= reassembly.buffered

    stuck = [
        f"stream {s} at {plan.frames[s][position[s]]!r:.80}"
        for s in range(streams)
        if position[s] < len(plan.frames[s])
    ]
    assert not stuck, f"deadlock: next_id={reassembly.next_id}, buffered={charged}, {stuck}"
    return reassembly, delivered


# No "explain" phase: on a failing example with hundreds of steps it takes minutes.
SCHEDULED = settings(
    max_examples=80,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


@SCHEDULED
@given(plan=plans(), max_buffered=budgets, data=st.data())
def test_any_interleaving_delivers_everything_once_in_order_without_deadlock(
    plan: Plan, max_buffered: int, data: st.DataObject
) -> None:
    reassembly, delivered = drive(plan, max_buffered, data)
    check_delivery(plan, delivered)
    assert (reassembly.buffered, reassembly.delivering, reassembly.pending) == (0, 0, 0)
    assert reassembly.next_id == len(plan.messages)


@SCHEDULED
@given(plan=plans(), max_buffered=budgets, data=st.data())
def test_any_interleaving_stays_within_the_memory_bound(
    plan: Plan, max_buffered: int, data: st.DataObject
) -> None:
    # The module's promise: over the budget only by the frames of ``next_id``.
    reassembly, _ = drive(plan, max_buffered, data)
    assert reassembly.peak <= max_buffered + plan.largest_cost, (
        f"peak {reassembly.peak} > budget {max_buffered} + largest message {plan.largest_cost}"
    )


# No shrinking either: the unit tests below pin each known way in; this one looks for more.
@settings(SCHEDULED, max_examples=150, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(plan=plans(max_messages=12, max_size=6 * 1024), max_buffered=budgets, data=st.data())
def test_a_duplicated_frame_is_always_refused_never_delivered_twice(
    plan: Plan, max_buffered: int, data: st.DataObject
) -> None:
    sources = [(s, i) for s in range(plan.streams) for i in range(len(plan.frames[s]))]
    source_stream, source_at = data.draw(st.sampled_from(sources))
    copy = plan.frames[source_stream][source_at]
    target = data.draw(st.integers(0, plan.streams - 1))
    frames = list(plan.frames[target])
    # Where the copy keeps the target stream's ids nondecreasing: only the copy is wrong.
    low = sum(f.message_id < copy.message_id for f in frames)
    high = sum(f.message_id <= copy.message_id for f in frames)
    frames.insert(data.draw(st.integers(low, high)), copy)
    damaged = Plan(
        plan.streams,
        plan.messages,
        tuple(tuple(frames) if s == target else plan.frames[s] for s in range(plan.streams)),
        plan.first_stream,
        plan.costs,
    )
    with pytest.raises(ProtocolError, match="twice"):
        drive(damaged, max_buffered, data)


# -- property B: real threads, the receiver's pattern -----------------------------------------


# No shrinking: a stall costs DEADLINE seconds a try, and timing does not shrink anyway.
@settings(
    max_examples=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    plan=plans(),
    max_buffered=budgets,
    batch_size=st.integers(1, 8),
    done_every=st.integers(1, 64),
    idle_every=st.integers(0, 4),
)
def test_threads_deliver_everything_in_order_without_stalling(
    plan: Plan, max_buffered: int, batch_size: int, done_every: int, idle_every: int
) -> None:
    # Each reader follows the receiver: push a batch; on no room, wait_for_room and push
    # the rest; every ``idle_every`` batches (0: never) its socket has nothing to read, so
    # it announce()s before blocking; at the end, announce() and end_stream().
    reassembly = Reassembly(plan.streams, max_buffered=max_buffered)
    errors: list[BaseException] = []
    dropped: list[int] = []
    delivered: list[Ready] = []

    def reader(stream: int) -> None:
        try:
            frames = plan.frames[stream]
            for number, at in enumerate(range(0, len(frames), batch_size), 1):
                batch = frames[at : at + batch_size]
                taken = reassembly.push(stream, batch)
                while taken < len(batch):
                    reassembly.wait_for_room(batch[taken], 0.05)
                    taken += reassembly.push(stream, batch[taken:])
                if idle_every and number % idle_every == 0:
                    reassembly.announce()
            reassembly.announce()
            dropped.append(reassembly.end_stream())
        except Closed:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def consumer() -> None:
        try:
            while (batch := reassembly.take(None)) is not None:
                for at in range(0, len(batch), done_every):
                    part = batch[at : at + done_every]
                    delivered.extend(part)
                    reassembly.done(cost(part))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [
        threading.Thread(target=reader, args=(s,), name=f"test-reader-{s}", daemon=True)
        for s in range(plan.streams)
    ]
    threads.append(threading.Thread(target=consumer, name="test-consumer", daemon=True))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    stalled = [thread.name for thread in threads if thread.is_alive()]
    if stalled:
        state = (reassembly.next_id, reassembly.buffered, reassembly.delivering)
        reassembly.close()
        for thread in threads:
            thread.join(2.0)
        pytest.fail(f"stalled after {DEADLINE}s: {stalled}; next_id, buffered, delivering={state}")
    assert not errors, errors
    assert sorted(dropped) == [0] * plan.streams
    check_delivery(plan, delivered)
    assert reassembly.peak <= max_buffered + plan.largest_cost
    assert (reassembly.buffered, reassembly.delivering, reassembly.pending) == (0, 0, 0)


# -- the rules ---------------------------------------------------------------------------------


def whole(mid: int, data: bytes = b"abc") -> Frame:
    """A single-chunk message."""
    return Frame(mid, 0, 1, len(data), data, len(data))


def chunk(mid: int, index: int, count: int, total: int, length: int) -> Frame:
    return Frame(mid, index, count, total, bytes([index % 256]) * length, length)


def roomy(streams: int = 2) -> Reassembly:
    return Reassembly(streams, max_buffered=1 << 30)


def test_ids_must_not_decrease_on_a_stream() -> None:
    reassembly = roomy()
    assert reassembly.push(0, [whole(1)]) == 1
    with pytest.raises(ProtocolError, match="must not decrease"):
        reassembly.push(0, [whole(0)])
    with pytest.raises(ProtocolError, match="must not decrease"):
        roomy().push(0, [whole(2), whole(1)])  # within one batch too
    reserving = roomy()
    assert reserving.reserve(0, whole(1))
    with pytest.raises(ProtocolError, match="must not decrease"):
        reserving.reserve(0, whole(0))
    # The same ids on two streams are fine: the rule is per stream.
    fine = roomy()
    assert fine.push(0, [whole(1)]) == 1
    assert fine.push(1, [whole(0)]) == 1
    assert ids(fine.take(0)) == [0, 1]


def test_a_duplicate_chunk_is_refused() -> None:
    reassembly = roomy()
    assert reassembly.push(0, [chunk(0, 0, 2, 2048, 1024)]) == 1
    with pytest.raises(ProtocolError, match="chunk 0 of message 0 received twice"):
        reassembly.push(1, [chunk(0, 0, 2, 2048, 1024)])
    # A chunk claimed by reserve() and not yet stored is taken all the same.
    reserving = roomy()
    assert reserving.reserve(0, chunk(0, 1, 2, 2048, 1024))
    with pytest.raises(ProtocolError, match="received twice"):
        reserving.push(1, [chunk(0, 1, 2, 2048, 1024)])


def test_a_message_already_complete_or_delivered_is_refused() -> None:
    reassembly = roomy(3)
    assert reassembly.push(0, [whole(0), whole(2)]) == 2  # 0 ready, 2 complete and waiting
    with pytest.raises(ProtocolError, match="message 0 received twice"):
        reassembly.push(1, [whole(0)])  # id < next_id
    with pytest.raises(ProtocolError, match="message 2 received twice"):
        reassembly.push(1, [whole(2)])  # complete, not yet delivered
    batch = reassembly.take(0)
    assert batch is not None
    reassembly.done(cost(batch))
    with pytest.raises(ProtocolError, match="message 0 received twice"):
        reassembly.push(2, [chunk(0, 1, 2, 2048, 1024)])  # delivered and done


def test_a_complete_message_arriving_again_as_the_next_one_is_refused() -> None:
    # Message 1 is complete (out of order, waiting for 0). Then one batch brings message 0
    # and a second copy of message 1, which is now the next to deliver.
    reassembly = roomy()
    assert reassembly.push(1, [whole(1, b"first")]) == 1
    with pytest.raises(ProtocolError, match="message 1 received twice"):
        reassembly.push(0, [whole(0), whole(1, b"again")])


def test_ids_beyond_the_window_are_refused() -> None:
    reassembly = roomy(3)
    assert reassembly.push(0, [whole(wire.ID_WINDOW - 1)]) == 1  # next_id + ID_WINDOW - 1
    with pytest.raises(ProtocolError, match="too far ahead"):
        reassembly.push(1, [whole(wire.ID_WINDOW)])
    assert reassembly.push(1, [whole(0)]) == 1  # next_id becomes 1: the window slides
    assert reassembly.push(1, [whole(wire.ID_WINDOW)]) == 1
    with pytest.raises(ProtocolError, match="too far ahead"):
        reassembly.reserve(2, whole(wire.ID_WINDOW + 1))


def test_chunks_must_agree_on_count_and_total() -> None:
    reassembly = roomy()
    assert reassembly.push(0, [chunk(0, 0, 3, 3000, 1024)]) == 1
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembly.push(1, [chunk(0, 1, 4, 3000, 1024)])
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembly.push(1, [chunk(0, 1, 3, 3001, 1024)])
    later = roomy()  # the same for a message that is not the next one
    assert later.push(0, [chunk(5, 0, 2, 2048, 1024)]) == 1
    with pytest.raises(ProtocolError, match="disagrees"):
        later.push(1, [whole(5, bytes(2048))])


def test_a_whole_frame_of_the_next_message_must_agree_with_its_chunks_already_there() -> None:
    # Message 0 (the next to deliver) has chunk 0 of 2 buffered; then a frame claiming
    # message 0 is one chunk of 2048 bytes arrives on another stream.
    reassembly = roomy()
    assert reassembly.push(0, [chunk(0, 0, 2, 2048, 1024)]) == 1
    with pytest.raises(ProtocolError, match="disagrees"):
        reassembly.push(1, [whole(0, bytes(2048))])


def test_a_whole_frame_duplicating_a_reserved_one_is_refused() -> None:
    # A large single-frame message 0 is admitted by reserve() while its payload is read;
    # the same message arriving whole on another stream meanwhile is a duplicate.
    reassembly = roomy()
    big = whole(0, bytes(64 * 1024))
    assert reassembly.reserve(0, big._replace(payload=b""))
    with pytest.raises(ProtocolError, match="twice"):
        reassembly.push(1, [big])


def test_chunk_lengths_must_add_up_to_the_total() -> None:
    over = roomy()
    assert over.push(0, [chunk(0, 0, 2, 1500, 1024)]) == 1
    with pytest.raises(ProtocolError, match="exceed its length"):
        over.push(1, [chunk(0, 1, 2, 1500, 1024)])
    under = roomy()
    assert under.push(0, [chunk(0, 0, 2, 3000, 1024)]) == 1
    with pytest.raises(ProtocolError, match="is 2048 bytes, its header says 3000"):
        under.push(1, [chunk(0, 1, 2, 3000, 1024)])
    assert under.take(0) == []  # nothing of either reached delivery


@pytest.mark.parametrize("mid", [0, 1], ids=["next", "later"])
def test_a_single_chunk_must_carry_its_whole_total(mid: int) -> None:
    reassembly = roomy()
    with pytest.raises(ProtocolError, match="is 5 bytes, its header says 10"):
        reassembly.push(0, [Frame(mid, 0, 1, 10, b"12345", 5)])
    assert reassembly.take(0) == []


def test_in_order_whole_messages_wait_for_room_too() -> None:
    # The commonest traffic: one stream, small messages in order, a slow on_message.
    budget = 4 * 1024
    reassembly = Reassembly(1, max_buffered=budget)
    frames = [whole(mid, bytes(1024)) for mid in range(1000)]
    taken = reassembly.push(0, frames)
    # Three fit the budget; the fourth is next_id, but delivery holds 0..2: it waits.
    assert taken == 3, f"{taken} frames admitted, {reassembly.buffered} bytes for a {budget} budget"
    assert reassembly.buffered <= budget


@pytest.mark.parametrize("shape", ["chunked", "whole"])
def test_the_next_message_is_admitted_over_budget_only_when_delivery_holds_nothing(
    shape: str,
) -> None:
    reassembly = Reassembly(2, max_buffered=1)  # smaller than any frame
    one = chunk(1, 0, 2, 2048, 1024) if shape == "chunked" else whole(1, bytes(1024))
    assert reassembly.push(1, [one]) == 0  # out of order: no room
    assert not reassembly.wait_for_room(one, 0)
    assert reassembly.push(0, [whole(0, b"x" * 5000)]) == 1  # next_id: over budget
    assert reassembly.push(1, [one]) == 0  # now next_id, but message 0 is delivering
    batch = reassembly.take(0)
    assert ids(batch) == [0]
    assert reassembly.push(1, [one]) == 0  # taken is not done
    assert not reassembly.wait_for_room(one, 0)
    reassembly.done(cost(batch))
    assert reassembly.wait_for_room(one, 0)
    assert reassembly.push(1, [one]) == 1


# -- waking the delivery thread ---------------------------------------------------------------


def in_thread(target: object) -> tuple[threading.Thread, list[object]]:
    """Run ``target()`` in a thread; its return value or exception lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(target())  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, name="test-blocked", daemon=True)
    thread.start()
    return thread, outcome


def wait_asleep(reassembly: Reassembly) -> None:
    """Wait until the delivery thread is parked in take() (the state under test)."""
    wait_until(lambda: reassembly._taker_asleep)


def asleep_in_take(reassembly: Reassembly) -> tuple[threading.Thread, list[object]]:
    thread, outcome = in_thread(lambda: reassembly.take(None))
    wait_asleep(reassembly)
    assert thread.is_alive() and not outcome, "take(None) returned with nothing ready"
    return thread, outcome


def test_announce_wakes_the_delivery_thread() -> None:
    reassembly = roomy()
    thread, outcome = asleep_in_take(reassembly)
    assert reassembly.push(0, [whole(0)]) == 1  # one small message: the wake may be deferred
    reassembly.announce()  # a reader about to block on its socket
    thread.join(5.0)
    assert not thread.is_alive()
    assert [ids(batch) for batch in outcome] == [[0]]  # type: ignore[arg-type]


def test_many_ready_messages_wake_the_delivery_thread_without_announce() -> None:
    reassembly = roomy()
    thread, outcome = asleep_in_take(reassembly)
    count = ANNOUNCE_COUNT
    assert reassembly.push(0, [whole(mid) for mid in range(count)]) == count
    thread.join(5.0)
    assert not thread.is_alive()
    assert [ids(batch) for batch in outcome] == [list(range(count))]  # type: ignore[arg-type]


def test_a_reader_waiting_for_room_wakes_the_delivery_thread() -> None:
    # The delivery thread sleeps; a reader's batch completes message 0 (not announced: one
    # message) and then has no room for message 1. Only delivery can free room, so waiting
    # for it must wake delivery, or both wait forever.
    reassembly = Reassembly(1, max_buffered=1000)

    def deliver() -> None:
        while (ready := reassembly.take(None)) is not None:
            reassembly.done(cost(ready))

    consumer, _ = in_thread(deliver)
    wait_asleep(reassembly)
    batch = [whole(0, bytes(5000)), chunk(1, 0, 2, 2048, 1024)]
    try:
        assert reassembly.push(0, batch) == 1
        assert reassembly.wait_for_room(batch[1], 3.0), "no room: delivery was never woken"
        assert reassembly.push(0, batch[1:]) == 1
    finally:
        reassembly.close()
        consumer.join(5.0)
    assert not consumer.is_alive()


# -- closing and ending ------------------------------------------------------------------------


def test_close_wakes_a_reader_waiting_for_room() -> None:
    reassembly = Reassembly(1, max_buffered=100)
    later = whole(1, b"x" * 1000)
    assert reassembly.push(0, [later]) == 0
    thread, outcome = in_thread(lambda: reassembly.wait_for_room(later, 30.0))
    thread.join(0.2)
    assert thread.is_alive(), "wait_for_room returned without room"
    started = time.monotonic()
    reassembly.close()
    thread.join(5.0)
    # Woken by close(): far sooner than its 30 s wait_for_room timeout.
    assert not thread.is_alive()
    assert time.monotonic() - started < 10.0
    assert len(outcome) == 1 and isinstance(outcome[0], Closed)
    for call in (
        lambda: reassembly.push(0, [whole(0)]),
        lambda: reassembly.reserve(0, whole(0)),
        lambda: reassembly.store(whole(0)),
        lambda: reassembly.wait_for_room(whole(0), 0),
    ):
        with pytest.raises(Closed):
            call()


def test_close_wakes_the_delivery_thread_waiting_to_take() -> None:
    reassembly = roomy()
    thread, outcome = in_thread(lambda: reassembly.take(None))
    thread.join(0.2)
    assert thread.is_alive(), "take(None) returned with nothing ready"
    reassembly.close()
    thread.join(5.0)
    assert not thread.is_alive()
    assert outcome == [None]


def test_close_with_drain_keeps_the_messages_already_ready() -> None:
    reassembly = roomy()
    assert reassembly.push(0, [whole(0, b"zero"), whole(1, b"one"), whole(3, b"three")]) == 3
    assert reassembly.push(1, [chunk(2, 0, 2, 2048, 1024)]) == 1  # 2 partial, 3 complete
    reassembly.close(drain=True)
    assert reassembly.buffered == reassembly.delivering == 4 + 3 + 2 * FRAME_OVERHEAD
    batch = reassembly.take(0)
    assert batch is not None
    assert [(ready[0], joined(ready)) for ready in batch] == [(0, b"zero"), (1, b"one")]
    assert reassembly.take(0) is None
    reassembly.done(cost(batch))
    assert (reassembly.buffered, reassembly.delivering) == (0, 0)


def test_close_without_drain_drops_everything() -> None:
    reassembly = roomy()
    assert reassembly.push(0, [whole(0), whole(1)]) == 2
    reassembly.close()
    assert reassembly.take(None) is None
    assert (reassembly.buffered, reassembly.delivering, reassembly.pending) == (0, 0, 0)


@pytest.mark.parametrize("drain", [False, True])
def test_close_while_a_batch_is_being_delivered_keeps_the_counters_sound(drain: bool) -> None:
    # The delivery thread took a batch and is inside on_message; meanwhile more messages
    # become ready, and the session aborts (the receiver closes with drain=True on any
    # protocol error). Then delivery calls done() for the batch, takes the rest, done().
    reassembly = roomy()
    assert reassembly.push(0, [whole(0, b"x" * 100), whole(1, b"y" * 50)]) == 2
    first = reassembly.take(0)
    assert ids(first) == [0, 1]
    assert reassembly.push(0, [whole(2, b"z" * 10)]) == 1
    reassembly.close(drain=drain)
    reassembly.done(cost(first))
    assert 0 <= reassembly.delivering <= reassembly.buffered
    if drain:
        rest = reassembly.take(0)
        assert ids(rest) == [2]
        reassembly.done(cost(rest))
    assert reassembly.take(0) is None
    assert (reassembly.buffered, reassembly.delivering) == (0, 0)


def test_ending_every_stream_drops_incomplete_messages_and_ends_delivery() -> None:
    reassembly = roomy(3)
    assert reassembly.push(0, [whole(0, b"zero"), chunk(1, 0, 2, 2048, 1024)]) == 2
    assert reassembly.push(1, [whole(3, b"three")]) == 1  # complete, but after the gap
    thread, outcome = in_thread(lambda: [reassembly.take(None), reassembly.take(None)])
    assert reassembly.end_stream() == 0
    assert reassembly.end_stream() == 0
    assert not reassembly.ended
    assert reassembly.end_stream() == 2  # message 1 (partial) and 3 (complete, not ready)
    assert reassembly.end_stream() == 0  # counted once
    thread.join(5.0)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], list)
    first, second = outcome[0]
    assert [(ready[0], joined(ready)) for ready in first] == [(0, b"zero")]
    assert second is None
    assert reassembly.buffered == reassembly.delivering == 4 + FRAME_OVERHEAD
    reassembly.done(4 + FRAME_OVERHEAD)
    assert (reassembly.buffered, reassembly.pending) == (0, 0)


def test_take_waits_only_up_to_its_timeout() -> None:
    reassembly = roomy()
    started = time.monotonic()
    assert reassembly.take(0.05) == []
    # Waited its timeout; the upper bound only catches a take that ignored it (nothing
    # arrives, so it would block for ever).
    assert 0.04 <= time.monotonic() - started < 10.0


# -- memory follows bytes received ------------------------------------------------------------


def test_a_huge_claimed_total_charges_only_the_bytes_received() -> None:
    total = 64 * 1024 * 1024
    count = total // MIN
    reassembly = Reassembly(1, max_buffered=1 << 40)
    tracemalloc.start()
    try:
        assert reassembly.reserve(0, Frame(0, 0, count, total, b"", MIN))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reassembly.buffered == MIN + FRAME_OVERHEAD
    assert peak < 64 * 1024, f"a header alone allocated {peak} bytes"
    reassembly.store(Frame(0, 0, count, total, bytes(MIN), MIN))
    assert reassembly.buffered == MIN + FRAME_OVERHEAD
    assert reassembly.pending == 1 and reassembly.take(0) == []
    # The same through push(), many chunks in: still only what arrived.
    pushed = Reassembly(1, max_buffered=1 << 40)
    frames = [Frame(0, i, count, total, bytes(MIN), MIN) for i in range(1, 9)]
    assert pushed.push(0, frames) == 8
    assert pushed.buffered == 8 * (MIN + FRAME_OVERHEAD)


def test_frames_of_later_messages_stop_at_the_budget() -> None:
    budget = 10 * (MIN + FRAME_OVERHEAD)
    reassembly = Reassembly(1, max_buffered=budget)
    later = [chunk(1, i, 100, 100 * MIN, MIN) for i in range(20)]
    assert reassembly.push(0, later) == 10
    assert reassembly.buffered == budget
    empties = Reassembly(1, max_buffered=100 * FRAME_OVERHEAD)
    flood = [whole(mid, b"") for mid in range(1, 1000)]  # empty messages cost their overhead
    assert empties.push(0, flood) == 100


def test_a_nudge_wakes_the_delivery_thread_with_nothing_ready() -> None:
    # A PING asked for an ACK: delivery must decide on it now, not at its ACK delay.
    reassembly = roomy()
    thread, outcome = asleep_in_take(reassembly)
    reassembly.nudge()
    thread.join(5.0)
    assert not thread.is_alive()
    assert outcome == [[]]


def test_a_nudge_while_delivery_is_busy_makes_its_next_take_return_at_once() -> None:
    # The ACK was asked for while the delivery thread was handing messages on: its next
    # take() must not sleep (a minute, were that its ACK delay) before deciding.
    reassembly = roomy()
    reassembly.nudge()
    thread, outcome = in_thread(lambda: reassembly.take(None))
    thread.join(5.0)
    assert not thread.is_alive(), "take() slept through the nudge"
    assert outcome == [[]]
    assert reassembly.take(0) == []  # the nudge is spent: this one timed out


def test_what_is_ready_comes_before_a_nudge() -> None:
    reassembly = roomy()
    assert reassembly.push(0, [whole(0)]) == 1
    reassembly.nudge()
    batch = reassembly.take(0)
    assert batch is not None and ids(batch) == [0]
    assert reassembly.take(None) == []  # then the nudge, still pending


def test_last_id_is_the_highest_message_id_read_on_a_stream() -> None:
    reassembly = Reassembly(2, max_buffered=1 << 20, first_id=5)
    assert reassembly.last_id(0) == reassembly.last_id(1) == 5
    assert reassembly.push(0, [whole(5), whole(7)]) == 2
    assert reassembly.push(1, [whole(6)]) == 1
    assert (reassembly.last_id(0), reassembly.last_id(1)) == (7, 6)


def test_whole_messages_ahead_of_the_next_one_are_charged_and_released_in_order() -> None:
    # Four streams, round robin, as a sender stripes one-chunk messages: every stream but
    # the one carrying the next id stores whole messages ahead of it. They are charged to
    # the budget (and the peak) while they wait, and released in id order once the gap fills.
    reassembly = roomy(4)
    for stream in (3, 2, 1):
        assert reassembly.push(stream, [whole(mid) for mid in range(stream, 40, 4)]) == 10
    assert reassembly.take(0) == []  # message 0 has not come
    waiting = 30 * (3 + FRAME_OVERHEAD)
    assert reassembly.buffered == reassembly.peak == waiting
    assert reassembly.push(0, [whole(mid) for mid in range(0, 40, 4)]) == 10
    batch = reassembly.take(0)
    assert batch is not None
    assert ids(batch) == list(range(40))
    assert reassembly.buffered == reassembly.peak == 40 * (3 + FRAME_OVERHEAD)
    reassembly.done(cost(batch))
    assert reassembly.buffered == 0
    assert [reassembly.last_id(stream) for stream in range(4)] == [36, 37, 38, 39]

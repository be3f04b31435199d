"""The benchmark scenarios; each returns a list of Results measured side by side in one run."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable

import pybreaker

import dwcp
from benchmarks.harness import Result, alternate, percentile, throughput

# -- helpers -------------------------------------------------------------------------------------


class SlowPeerTransport:
    """A transport whose send blocks about 1 ms, standing in for a peer that takes 1 ms per
    message (an acknowledged send); it releases the GIL while it waits, as socket I/O does."""

    def __init__(self, delay: float = 0.001) -> None:
        self._delay = delay
        self._event = threading.Event()  # never set: wait() is an interruptible 1 ms block

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self._event.wait(self._delay)

    def health_check(self) -> None:
        pass


class QuietLayer:
    """A layer that is healthy, optionally hangs in its health check until released."""

    def __init__(self, hang: threading.Event | None = None) -> None:
        self.hang = hang
        self.healthy = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def is_healthy(self) -> bool:
        if self.hang is not None:
            self.hang.wait()
        return self.healthy


def run_threads(count: int, per_thread: int, send: Callable[[bytes], object]) -> int:
    """Start ``count`` threads that each call ``send`` ``per_thread`` times; return the total."""
    barrier = threading.Barrier(count + 1)
    payload = b"x" * 1024

    def worker() -> None:
        barrier.wait()
        for _ in range(per_thread):
            send(payload)

    threads = [threading.Thread(target=worker, name=f"bench-sender-{i}") for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    return count * per_thread


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


# -- 2. concurrency ------------------------------------------------------------------------------


def concurrency(quick: bool) -> list[Result]:
    """4 and 8 threads through one manager versus the same threads calling the transport."""
    per_thread = 100 if quick else 400
    rounds = 3 if quick else 7
    return [_concurrency_at(threads, per_thread, rounds) for threads in (4, 8)]


def _concurrency_at(threads: int, per_thread: int, rounds: int) -> Result:
    transport = SlowPeerTransport()
    manager = dwcp.Manager(transport, health_interval=3600)
    manager.start()
    plain = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    def through_plain_pybreaker(data: bytes) -> None:
        plain.call(transport.send, data)

    try:
        ours_median, direct_median, _, _ = alternate(
            lambda: throughput(
                lambda: run_threads(threads, per_thread, manager.send_with_circuit_breaker)
            ),
            lambda: throughput(lambda: run_threads(threads, per_thread, transport.send)),
            rounds=rounds,
        )
        # pybreaker's call() serialises the senders, so a quarter of the work is plenty.
        pybreaker_rate = throughput(
            lambda: run_threads(threads, per_thread // 4, through_plain_pybreaker)
        )
    finally:
        manager.stop()
    return Result(
        scenario=f"2. concurrency, {threads} threads, 1 ms peer",
        metric="msgs/s",
        ours=ours_median,
        reference=direct_median,
        target=">= 0.9x direct",
        met=ours_median / direct_median >= 0.9,
        notes=f"pybreaker call(): {pybreaker_rate:,.0f} msgs/s "
        f"({pybreaker_rate / direct_median:.2f}x direct)",
        extra={"pybreaker_call": pybreaker_rate},
    )


# -- 4. shutdown ---------------------------------------------------------------------------------


def shutdown(quick: bool) -> list[Result]:
    """p99 of stop() while idle and while a recovery is backing off."""
    runs = 30 if quick else 200
    results = []
    for label, backing_off in (("idle", False), ("during backoff", True)):
        samples = []
        for _ in range(runs):
            layer = QuietLayer()
            attempts = threading.Event()
            manager = dwcp.Manager(compression=layer, health_interval=3600, initial_backoff=30.0)

            def listen(event: dwcp.Event, attempts: threading.Event = attempts) -> None:
                if isinstance(event, dwcp.RecoveryAttempt):
                    attempts.set()

            manager.add_listener(listen)
            manager.start()
            if backing_off:
                layer.healthy = False
                manager.check_component_health()
                if not attempts.wait(5):
                    raise RuntimeError("recovery did not start")
            began = time.perf_counter()
            manager.stop()
            samples.append(time.perf_counter() - began)
        p99 = percentile(samples, 0.99) * 1000
        results.append(
            Result(
                scenario=f"4. stop() {label}",
                metric="p99 ms",
                ours=p99,
                reference=None,
                target="< 50 ms",
                met=p99 < 50,
                unit=" ms",
                notes=f"median {percentile(samples, 0.5) * 1000:.2f} ms over {runs} runs",
            )
        )
    return results


# -- 6. scale ------------------------------------------------------------------------------------


def scale(quick: bool) -> list[Result]:
    """One health pass over 1,000 registered layers, one of them hung, against the timeout."""
    timeout = 0.5
    hang = threading.Event()
    layers = {f"layer-{i}": QuietLayer() for i in range(999)}
    layers["layer-hung"] = QuietLayer(hang)
    manager = dwcp.Manager(layers=layers, health_interval=3600, health_check_timeout=timeout)
    samples = []
    try:
        for _ in range(3 if quick else 5):
            began = time.perf_counter()
            health = manager.check_component_health()
            samples.append(time.perf_counter() - began)
            if health["layer-hung"].healthy or sum(h.healthy for h in health.values()) != 999:
                raise RuntimeError("the pass did not report the hung layer alone as unhealthy")
            hang.set()  # let the hung check end so that the next pass checks it (and hangs) again
            _wait_until(lambda: manager.check_component_health()["layer-hung"].healthy)
            hang.clear()
    finally:
        hang.set()
    worst = max(samples)
    return [
        Result(
            scenario="6. health pass, 1,000 layers, 1 hung",
            metric="seconds (worst)",
            ours=worst,
            reference=timeout,
            target="<= timeout + 10%",
            met=worst <= timeout * 1.1,
            unit=" s",
            notes=f"health_check_timeout {timeout} s; median {percentile(samples, 0.5):.3f} s",
        )
    ]


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("condition not met in time")
        threading.Event().wait(0.001)


# -- 7. soak -------------------------------------------------------------------------------------


def soak(quick: bool) -> list[Result]:
    """10,000 failure/recovery cycles: threads back to baseline, resident memory growth."""
    cycles = 1000 if quick else 10_000
    layer = QuietLayer()

    class Healing(QuietLayer):
        def start(self) -> None:
            self.healthy = True

    layer = Healing()
    manager = dwcp.Manager(compression=layer, health_interval=3600, initial_backoff=0)
    manager.start()
    # Warm up allocator pools and caches before taking the baseline.
    for _ in range(200):
        layer.healthy = False
        manager.attempt_component_recovery("compression")
    gc.collect()
    threads_before = threading.active_count()
    rss_before = rss_bytes()
    began = time.perf_counter()
    for _ in range(cycles):
        layer.healthy = False
        if not manager.attempt_component_recovery("compression"):
            raise RuntimeError("recovery failed during soak")
    elapsed = time.perf_counter() - began
    gc.collect()
    deadline = time.monotonic() + 10
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    threads_after = threading.active_count()
    growth = (rss_bytes() - rss_before) / 2**20
    manager.stop()
    return [
        Result(
            scenario=f"7. soak, {cycles:,} failure/recovery cycles",
            metric="RSS growth MiB",
            ours=growth,
            reference=None,
            target="< 5 MiB, threads at baseline",
            met=growth < 5 and threads_after == threads_before,
            unit=" MiB",
            notes=f"threads {threads_before} -> {threads_after}; {cycles / elapsed:,.0f} cycles/s",
        )
    ]

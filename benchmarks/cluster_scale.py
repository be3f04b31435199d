"""Cluster health at scale: 200 simulated nodes publishing into one redis-server.

``python -m benchmarks.cluster_scale [--nodes 200] [--passes 20]``

Starts a throw-away redis-server on a free loopback port (``redis-server`` must be on PATH),
makes one ``ClusterMember`` per simulated node (each with its own connection, as separate
processes would have) and measures, per pass per node:

- a publish (what every health pass costs a node): Redis round trips, bytes in and out as
  the server counts them (``INFO stats``), milliseconds; beside it the cheapest possible
  write of the same record (one plain ``SET``), alternating round by round;
- a read of the whole cluster (``cluster_health()``, two round trips; a watching node pays
  this each pass): milliseconds and bytes; beside it one ``MGET`` of the same records by
  known keys.

Then the shared breaker: how long after one manager opens it another one hears of it. A
listener subscribed to the change channel (idle: it sends nothing), beside one that does not
subscribe and reads the state every millisecond, as a busy sender would (the 50 ms
``sync_interval`` poll decides when it sees the change), alternating round by round.

Medians and 99th percentiles over every pass; ratio = median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dwcp._cluster import ClusterMember, cluster_health


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("redis-server did not answer within 10 s") from None
            threading.Event().wait(0.02)
    client.close()
    return proc, url


def _snapshot(i: int) -> dict[str, Any]:
    """A realistic health document: a transport and four layers."""
    components = {
        name: {"status": "healthy", "last_error": None, "seconds_in_status": 1234.5 + i}
        for name in ("transport", "compression", "prediction", "sync", "consensus")
    }
    return {
        "status": "healthy",
        "breaker": "closed",
        "breaker_storage": "shared",
        "components": components,
    }


def _net(admin: Any) -> tuple[int, int]:
    stats = admin.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


def run(nodes: int, passes: int) -> dict[str, float]:
    import redis

    proc, url = _start_redis()
    admin = redis.Redis.from_url(url, socket_timeout=5)
    members = [
        ClusterMember(url, f"node-{i:03d}", interval=10.0, watch=False) for i in range(nodes)
    ]
    plain = [redis.Redis.from_url(url, socket_timeout=1) for _ in range(nodes)]
    docs = [_snapshot(i) for i in range(nodes)]
    records = [m._record(d) for m, d in zip(members, docs)]
    try:
        for member, doc in zip(members, docs):  # warm-up: scripts loaded, connections open
            member._publish(doc)
        for client, record, i in zip(plain, records, range(nodes)):
            client.set(f"bench:plain:{i}", record)
        cluster_health(url)

        publish_ms: list[float] = []
        set_ms: list[float] = []
        ratios: list[float] = []
        trips_before = sum(m.round_trips for m in members)
        ours_in = ours_out = ref_in = ref_out = 0
        for round_ in range(passes):
            order = ("ours", "ref") if round_ % 2 == 0 else ("ref", "ours")
            totals: dict[str, float] = {}
            for side in order:
                before = _net(admin)
                began = time.perf_counter()
                if side == "ours":
                    for member, doc in zip(members, docs):
                        t0 = time.perf_counter()
                        member._publish(doc)
                        publish_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    for i, (client, record) in enumerate(zip(plain, records)):
                        t0 = time.perf_counter()
                        client.set(f"bench:plain:{i}", record)
                        set_ms.append((time.perf_counter() - t0) * 1000)
                totals[side] = time.perf_counter() - began
                after = _net(admin)
                if side == "ours":
                    ours_in += after[0] - before[0]
                    ours_out += after[1] - before[1]
                else:
                    ref_in += after[0] - before[0]
                    ref_out += after[1] - before[1]
            ratios.append(totals["ours"] / totals["ref"])
        publishes = passes * nodes
        trips = (sum(m.round_trips for m in members) - trips_before) / publishes

        read_ms: list[float] = []
        mget_ms: list[float] = []
        read_ratios: list[float] = []
        read_bytes = mget_bytes = 0
        keys = [f"dwcp:cluster:node:node-{i:03d}" for i in range(nodes)]
        for round_ in range(passes):
            order = ("ours", "ref") if round_ % 2 == 0 else ("ref", "ours")
            pair: dict[str, float] = {}
            for side in order:
                before = _net(admin)
                if side == "ours":
                    pair[side] = _timed(lambda: cluster_health(admin))
                    read_ms.append(pair[side])
                else:
                    pair[side] = _timed(lambda: admin.mget(keys))
                    mget_ms.append(pair[side])
                # INFO's own reply is counted too; it is the same on both sides.
                delta = _net(admin)[1] - before[1]
                if side == "ours":
                    read_bytes += delta
                else:
                    mget_bytes += delta
            read_ratios.append(pair["ours"] / pair["ref"])
        view = cluster_health(admin)
        assert len(view.nodes) == nodes and all(n.alive for n in view.nodes.values())
        return {
            "nodes": nodes,
            "passes": passes,
            "publish_round_trips": trips,
            "publish_bytes_in": ours_in / publishes,
            "publish_bytes_out": ours_out / publishes,
            "set_bytes_in": ref_in / publishes,
            "publish_ms_p50": statistics.median(publish_ms),
            "publish_ms_p99": _pct(publish_ms, 0.99),
            "set_ms_p50": statistics.median(set_ms),
            "publish_ratio": statistics.median(ratios),
            "pass_ms": statistics.median(publish_ms) * nodes,
            "read_ms_p50": statistics.median(read_ms),
            "read_ms_p99": _pct(read_ms, 0.99),
            "mget_ms_p50": statistics.median(mget_ms),
            "read_ratio": statistics.median(read_ratios),
            "read_bytes": read_bytes / passes,
            "mget_bytes": mget_bytes / passes,
        }
    finally:
        for member in members:
            member.close()
        for client in plain:
            client.close()
        admin.close()
        proc.terminate()
        proc.wait(10)


def breaker_propagation(rounds: int) -> dict[str, float]:
    """Milliseconds from one manager's opening send to another's ``BreakerStateChanged``."""
    import dwcp
    from dwcp.testing import FakeTransport

    proc, url = _start_redis()
    heard: dict[str, list[float]] = {"pubsub": [], "poll": []}
    try:
        for round_ in range(rounds):
            order = ("pubsub", "poll") if round_ % 2 == 0 else ("poll", "pubsub")
            for side in order:
                heard[side].append(
                    _one_opening(dwcp, FakeTransport, url, f"b{round_}-{side}", side)
                )
    finally:
        proc.terminate()
        proc.wait(10)
    ratios = [p / s for p, s in zip(heard["poll"], heard["pubsub"])]
    return {
        "rounds": rounds,
        "pubsub_ms_p50": statistics.median(heard["pubsub"]),
        "pubsub_ms_p99": _pct(heard["pubsub"], 0.99),
        "poll_ms_p50": statistics.median(heard["poll"]),
        "poll_ms_p99": _pct(heard["poll"], 0.99),
        "speedup": statistics.median(ratios),
    }


def _await_subscriber(url: str, channel: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        deadline = time.monotonic() + 5
        while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("the listener never subscribed")
            threading.Event().wait(0.001)
    finally:
        client.close()


def _one_opening(dwcp: Any, fake: Any, url: str, name: str, side: str) -> float:
    failing = fake()
    failing.fail_sends = OSError("peer down")
    opener = dwcp.Manager(failing, breaker_storage=url, breaker_name=name, max_failures=1,
                          reset_timeout=3600)  # fmt: skip
    listener = dwcp.Manager(fake(), breaker_storage=url, breaker_name=name, reset_timeout=3600)
    opened = threading.Event()
    at = [0.0]

    def on_event(event: object) -> None:
        if isinstance(event, dwcp.BreakerStateChanged) and event.to_state == "open":
            at[0] = time.perf_counter()
            opened.set()

    listener.add_listener(on_event)
    opener.start()
    listener.start()
    stop = threading.Event()
    poller = None
    if side == "poll":
        listener._breaker.close()  # no subscription: only the poll tells it

        def poll() -> None:
            while not stop.wait(0.001):
                listener.circuit_breaker_state  # noqa: B018 - each read may sync

        poller = threading.Thread(target=poll, name="bench-poller")
        poller.start()
    try:
        if side == "pubsub":
            _await_subscriber(url, f"{name}:pybreaker:changes")
        listener.circuit_breaker_state  # noqa: B018 - in sync before the clock starts
        # A random phase against the listener's 50 ms poll, as a real opening would have.
        threading.Event().wait(random.uniform(0.0, 0.05))
        began = time.perf_counter()
        try:
            opener.send_with_circuit_breaker(b"x")
        except dwcp.TransportError:
            pass
        if not opened.wait(5):
            raise SystemExit(f"{side}: the listener never heard the breaker open")
        return (at[0] - began) * 1000
    finally:
        stop.set()
        if poller is not None:
            poller.join(5)
        opener.stop()
        listener.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_scale", description=__doc__)
    parser.add_argument("--nodes", type=int, default=200, help="simulated nodes (default 200)")
    parser.add_argument("--passes", type=int, default=20, help="passes measured (default 20)")
    parser.add_argument(
        "--breaker-rounds", type=int, default=20, help="breaker openings timed (default 20)"
    )
    args = parser.parse_args(argv)
    r = run(args.nodes, args.passes)
    n = int(r["nodes"])
    print(f"cluster scale: {n} nodes, {int(r['passes'])} passes, one redis-server on loopback")
    print(
        f"publish, per node per pass: {r['publish_round_trips']:.2f} round trips, "
        f"{r['publish_bytes_in']:.0f} B to Redis, {r['publish_bytes_out']:.0f} B back, "
        f"{r['publish_ms_p50']:.3f} ms median ({r['publish_ms_p99']:.3f} ms p99); "
        f"plain SET of the record {r['set_ms_p50']:.3f} ms, {r['set_bytes_in']:.0f} B; "
        f"ratio {r['publish_ratio']:.2f}x"
    )
    print(f"{n} publishes back to back (one per node, one thread): {r['pass_ms']:.1f} ms")
    print(
        f"cluster_health() of {n} nodes: 2 round trips, {r['read_ms_p50']:.2f} ms median "
        f"({r['read_ms_p99']:.2f} ms p99), {r['read_bytes'] / 1024:.1f} KiB; "
        f"MGET of the same records {r['mget_ms_p50']:.2f} ms, {r['mget_bytes'] / 1024:.1f} KiB; "
        f"ratio {r['read_ratio']:.2f}x"
    )
    watching = r["read_bytes"] * n / 1024 / 1024
    print(f"if all {n} nodes watch (read each pass): {watching:.1f} MiB out of Redis per pass")
    b = breaker_propagation(args.breaker_rounds)
    print(
        f"shared breaker, another manager hears an open ({int(b['rounds'])} rounds): "
        f"subscribed and idle {b['pubsub_ms_p50']:.2f} ms median ({b['pubsub_ms_p99']:.2f} ms "
        f"p99); polling every 1 ms without the subscription {b['poll_ms_p50']:.2f} ms "
        f"({b['poll_ms_p99']:.2f} ms p99); {b['speedup']:.1f}x sooner"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A manager process in a cluster, for tests/ops/test_cluster_processes.py.

Usage: python -m tests.cluster_child REDIS_URL NODE_ID INTERVAL CHECK_TIMEOUT [LOST_AFTER]

Runs a Manager whose cluster and shared breaker use one Redis client, serves its health
server on a free loopback port (with LOST_AFTER, through a ``ClusterMember`` announcing that
many intervals as its bound), sends through the breaker every 20 ms, prints one JSON line
``{"url": ..., "pid": ...}`` once started and runs until stdin closes or it is killed.
"""

from __future__ import annotations

import json
import sys
import threading

import redis

import dwcp


class _Transport:
    """Always healthy; sends go nowhere (the breaker and the monitor are what is tested)."""

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def health_check(self) -> None:
        pass


def main() -> None:
    url, node_id, interval, check_timeout = sys.argv[1:5]
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    cluster: object = client
    named: str | None = node_id
    if len(sys.argv) > 5:
        from dwcp.cluster import ClusterMember

        every = float(interval) + float(check_timeout)
        cluster = ClusterMember(client, node_id, interval=every, lost_after=float(sys.argv[5]))
        named = None
    manager = dwcp.Manager(
        _Transport(),
        cluster=cluster,
        node_id=named,
        breaker_storage=client,  # one connection serves both
        breaker_name="cluster-test",
        health_interval=float(interval),
        health_check_timeout=float(check_timeout),
        health_port=0,
    )
    manager.start()
    stop = threading.Event()

    def send_forever() -> None:
        while not stop.wait(0.02):
            try:
                manager.send_with_circuit_breaker(b"x")
            except dwcp.DWCPError:
                pass

    sender = threading.Thread(target=send_forever, name="child-sender")
    sender.start()
    print(json.dumps({"url": manager.health_url, "node": node_id}), flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        stop.set()
        sender.join(5)
        manager.stop()


if __name__ == "__main__":
    main()

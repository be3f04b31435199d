"""ClusterMember's start()/close() interleavings, forced with events on a fake Redis client."""

from __future__ import annotations

import threading
from typing import Any

from dwcp.cluster import ClusterMember


class _HeldPing:
    """A Redis client whose PING is held until the member's close() has begun; a close of
    the client during the PING fails it as redis-py does (its connection torn down
    mid-read: ``AttributeError: 'NoneType' object has no attribute 'readline'``)."""

    def __init__(self) -> None:
        self.member: ClusterMember | None = None
        self.in_ping = threading.Event()
        self.closed = threading.Event()
        self.ping_ended = threading.Event()
        self.closed_before_ping_ended = False

    def ping(self) -> bool:
        self.in_ping.set()
        assert self.member is not None
        try:
            assert self.member._stop.wait(10), "close() never began"
            # Before the fix, close() closed the client here at once; after it, close()
            # waits for this check, so the client is still open when the PING answers.
            if self.closed.wait(0.5):
                raise AttributeError("'NoneType' object has no attribute 'readline'")
            return True
        finally:
            self.ping_ended.set()

    def close(self) -> None:
        self.closed_before_ping_ended = not self.ping_ended.is_set()
        self.closed.set()

    def register_script(self, script: str) -> Any:
        return lambda **kw: [1, "", 0]

    def __getattr__(self, name: str) -> Any:
        if name in ("get", "set", "incr", "setnx", "transaction", "eval", "pipeline", "mget"):
            return lambda *a, **kw: None
        raise AttributeError(name)


def _start_then_close(client: _HeldPing, member: ClusterMember, timeout: float) -> list[object]:
    client.member = member
    outcome: list[object] = []

    def start() -> None:
        try:
            member.start()
            outcome.append("ok")
        except BaseException as exc:  # noqa: BLE001 - the test reports what escaped
            outcome.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    assert client.in_ping.wait(10)
    member._owns_client = True  # a URL-made member closes its client in close()
    member.close(timeout)
    starter.join(10)
    assert not starter.is_alive()
    return outcome


def test_close_during_start_waits_for_its_redis_check_and_nothing_starts() -> None:
    client = _HeldPing()
    member = ClusterMember(client, "racer", interval=0.05)
    outcome = _start_then_close(client, member, timeout=5.0)
    assert outcome == ["ok"]  # a failed check is logged, never raised
    assert not client.closed_before_ping_ended  # close() waited for the check
    assert member._thread is None
    assert not any(t.name == "dwcp-cluster" for t in threading.enumerate())


def test_a_check_cut_by_close_past_its_timeout_is_logged_not_raised() -> None:
    client = _HeldPing()
    client.ping_ended.set()  # not asserted here: close() gives up waiting after 0 s

    member = ClusterMember(client, "racer", interval=0.05)
    outcome = _start_then_close(client, member, timeout=0.0)
    assert outcome == ["ok"], outcome  # redis-py's AttributeError did not escape start()
    assert member.last_error is not None and "AttributeError" in member.last_error
    assert not any(t.name == "dwcp-cluster" for t in threading.enumerate())


class _HeldGoodbye:
    """A Redis client whose goodbye publish is held until a second close() has begun (the
    member's stop event is set and ``second`` is); a close of the client during the publish
    fails it as redis-py does."""

    def __init__(self) -> None:
        self.in_goodbye = threading.Event()
        self.second = threading.Event()
        self.closed = threading.Event()
        self.closed_during_goodbye = False

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self.closed.set()

    def register_script(self, script: str) -> Any:
        def publish(**kw: Any) -> list[object]:
            self.in_goodbye.set()
            assert self.second.wait(10), "the second close() never began"
            if self.closed.wait(0.5):
                self.closed_during_goodbye = True
                raise AttributeError("'NoneType' object has no attribute 'readline'")
            return [1, "", 0]

        return publish

    def __getattr__(self, name: str) -> Any:
        if name in ("get", "set", "incr", "setnx", "transaction", "eval", "pipeline", "mget"):
            return lambda *a, **kw: None
        raise AttributeError(name)


def test_a_second_close_waits_for_the_goodbye_before_closing_the_client() -> None:
    client = _HeldGoodbye()
    member = ClusterMember(client, "leaver", interval=0.05, watch=False)
    member._owns_client = True  # a URL-made member closes its client in close()
    member.start()
    first = threading.Thread(target=member.close)
    first.start()
    assert client.in_goodbye.wait(10)
    client.second.set()
    member.close()  # before: closed the client at once, under the goodbye's publish
    first.join(10)
    assert not first.is_alive()
    assert not client.closed_during_goodbye
    assert client.closed.is_set()
    assert not any(t.name == "dwcp-cluster" for t in threading.enumerate())

"""A fault-injecting TCP proxy in a child process, between a transport and its receiver.

The proxy (``tests.faultproxy_child``) listens on a loopback port and forwards both
directions to ``target``; the parent switches its mode at run time (see
``tests.faultproxy_child.Proxy.set_mode`` for what each mode does)::

    def test_x(receiver_process, fault_proxy):
        receiver = receiver_process()
        proxy = fault_proxy(receiver.address)
        transport = MultiStreamTCPTransport(proxy.address, ...)
        proxy.stall()            # or .close_after(n), .reset(), .corrupt(n), .partial() ...
        proxy.passthrough()

Process lifetime is as for ``tests.procs.ChildProcess``: every proxy process is stopped by
pid at the fixture's teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ChildProcess

__all__ = ["FaultProxy", "fault_proxy_fixture"]


class FaultProxy(ChildProcess):
    """Parent handle of one proxy process; ``stats()`` returns the proxy's counters::

    {"mode": str, "params": {...}, "accepted": int (connections numbered 0.. in accept
     order), "refused": int, "connect_failed": int, "active": int, "bytes_up": int,
     "bytes_down": int, "fired": [{"action", "conn", "direction", "bytes_up", "bytes_down",
     "time"}, ...], "pairs": [{"number", "killed", "up", "down"}, ...]}
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path | None = None,
    ) -> None:
        target_host = f"[{target[0]}]" if ":" in target[0] else target[0]
        super().__init__(
            "tests.faultproxy_child",
            ["--target", f"{target_host}:{target[1]}", "--host", host],
            log_path=log_path,
        )
        self.target = target
        self.host = host
        ready = self._spawn(["--port", str(port)])
        self._port = int(ready["address"][1])

    @property
    def address(self) -> tuple[str, int]:
        """Where the proxy listens (connect the transport here)."""
        return self.host, self._port

    # -- modes ----------------------------------------------------------------------------

    def set_mode(self, name: str, **params: Any) -> dict[str, Any]:
        """Switch to mode ``name``; returns the stats right after the switch."""
        result: dict[str, Any] = self.request("mode", name=name, **params)
        return result

    def passthrough(self) -> dict[str, Any]:
        return self.set_mode("pass")

    def refuse(self) -> dict[str, Any]:
        """Close new connections at once (connections already open keep working)."""
        return self.set_mode("refuse")

    def stall(self) -> dict[str, Any]:
        """Stop forwarding both ways, sockets kept open: a peer that vanished silently."""
        return self.set_mode("stall")

    def close_after(
        self, after: int = 0, *, direction: str = "up", conn: int | None = None, scope: str = "all"
    ) -> dict[str, Any]:
        """Forward ``after`` more bytes, then close both sides (all connections, or "one")."""
        return self.set_mode("close", after=after, direction=direction, conn=conn, scope=scope)

    def reset(
        self, after: int = 0, *, direction: str = "up", conn: int | None = None, scope: str = "all"
    ) -> dict[str, Any]:
        """Like ``close_after`` but the sockets are reset (SO_LINGER 0: RST, not FIN)."""
        return self.set_mode("rst", after=after, direction=direction, conn=conn, scope=scope)

    def corrupt(
        self, after: int = 0, *, bit: int = 0, direction: str = "up", conn: int | None = None
    ) -> dict[str, Any]:
        """Flip bit ``bit`` of the byte that follows ``after`` more bytes, once."""
        return self.set_mode("corrupt", after=after, bit=bit, direction=direction, conn=conn)

    def partial(
        self, *, max_piece: int = 7, delay: float = 0.0005, every: int = 8
    ) -> dict[str, Any]:
        """Forward in pieces of 1..max_piece bytes, pausing ``delay`` s every ``every``."""
        return self.set_mode("partial", max_piece=max_piece, delay=delay, every=every)

    def rate(self, bytes_per_second: int, *, shared: bool = False) -> dict[str, Any]:
        """Limit every connection, each direction, to ``bytes_per_second``; ``shared``: all
        connections together, per direction (one slow link that every stream shares)."""
        return self.set_mode("rate", bytes_per_second=bytes_per_second, shared=shared)

    def blackhole(self, direction: str = "down") -> dict[str, Any]:
        """Discard every byte flowing ``direction`` (default "down": the receiver's ACKs)."""
        return self.set_mode("blackhole", direction=direction)

    def kill_all(self, action: str = "close") -> dict[str, Any]:
        """Close (``"close"``) or reset (``"rst"``) every current connection now."""
        result: dict[str, Any] = self.request("kill_all", action=action)
        return result

    # -- observing ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("stats")
        return result

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], object], timeout: float
    ) -> dict[str, Any]:
        """Poll ``stats()`` until ``predicate(stats)``; return them, AssertionError at timeout."""
        return self.poll_until(self.stats, predicate, timeout)

    def restart(self) -> None:
        """Replace the proxy process by a new one on the same port (mode back to pass)."""
        self.close()
        self._spawn(["--port", str(self._port)])


@pytest.fixture(name="fault_proxy")
def fault_proxy_fixture(tmp_path: Path) -> Iterator[Callable[..., FaultProxy]]:
    """Factory: ``fault_proxy(target, *, host="127.0.0.1", port=0) -> FaultProxy``.

    Every proxy process it started is stopped by pid at teardown; its log is printed then,
    which pytest shows for failed tests.
    """
    made: list[FaultProxy] = []

    def make(target: tuple[str, int], **kwargs: Any) -> FaultProxy:
        kwargs.setdefault("log_path", tmp_path / f"proxy-{len(made)}.log")
        proxy = FaultProxy(target, **kwargs)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()
        print(f"---- {proxy.log_path}\n{proxy.log_tail()}")

"""A fault-injecting TCP proxy in a process of its own (``tests.faultproxy.FaultProxy``).

``python -m tests.faultproxy_child --target HOST:PORT [--host H] [--port P]`` listens on
``H:P`` and forwards every accepted connection to the target, both directions ("up": client
to target, "down": target to client), one thread per direction. The control channel
(``tests._control``) switches the mode at run time; see ``Proxy.set_mode`` for the modes.
Connections are numbered from 0 in accept order (a transport connects its streams in
index order, so stream i of the next ``start()`` is connection ``accepted + i``).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import sys
import threading
import time
from typing import Any

from tests._control import send, serve, take_stdout

_POLL = 0.5  # socket timeout: how often a blocked pump re-checks its state
_BUFFER = 65536
_COUNTED = ("close", "rst", "corrupt")
MODES = ("pass", "refuse", "stall", "partial", "rate", "blackhole", *_COUNTED)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [proxy] {message}", file=sys.stderr, flush=True)


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class _Pair:
    """A client connection and its connection to the target."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket) -> None:
        self.number = number
        self.client = client
        self.server = server
        self.killed = False
        self.action = "close"
        self.wake = threading.Event()  # set when killed: cuts pacing waits short
        self.bytes = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._running = 2

    def kill(self, action: str) -> bool:
        """Stop both pumps; the last one to leave closes (``close``) or resets (``rst``)."""
        with self._lock:
            if self.killed:
                return False
            self.killed, self.action = True, action
        self.wake.set()
        for sock in (self.client, self.server):
            # SHUT_RD wakes a pump blocked in recv() and sends nothing to the peer, so the
            # peers learn of the end only from the final close (FIN) or reset (RST).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        return True

    def pump_done(self) -> bool:
        """Called by each pump as it leaves; True for the last one, which then closes."""
        with self._lock:
            self._running -= 1
            if self._running:
                return False
        socks = (self.client, self.server)
        if self.killed and self.action == "rst":
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif self.killed:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for sock in socks:
            sock.close()
        return True


class Proxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.listener = socket.create_server(listen, family=family)
        self.listener.settimeout(_POLL)
        self.address = self.listener.getsockname()[:2]
        self._cond = threading.Condition()  # an RLock: kill() may run under it
        self._mode = "pass"
        self._params: dict[str, Any] = {}
        self._generation = 0
        self._remaining = 0
        self._frozen = False  # a counted fault fired: nobody forwards until it is applied
        self._pairs: dict[int, _Pair] = {}
        self._threads: list[threading.Thread] = []
        self._numbers = 0
        self._refused = 0
        self._connect_failed = 0
        self._bytes = {"up": 0, "down": 0}
        self._fired: list[dict[str, Any]] = []
        # mode "rate", shared: per direction, when the shared link is free again.
        self._pace_lock = threading.Lock()
        self._link_free = {"up": 0.0, "down": 0.0}
        self._stopping = False
        self._accept_thread = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._accept_thread.start()

    # -- control --------------------------------------------------------------------------

    def set_mode(self, name: str, **params: Any) -> dict[str, Any]:
        """Switch the mode for all connections, current and new:

        ``pass``: forward unchanged. ``refuse``: close new connections at once (current ones
        keep going). ``stall``: stop forwarding both ways but keep every socket open (a peer
        that vanished silently); another mode resumes. ``partial`` (``max_piece``=7,
        ``delay``=0.0005, ``every``=8, ``seed``=0): forward in pieces of 1..max_piece bytes,
        pausing ``delay`` s after every ``every`` pieces. ``rate`` (``bytes_per_second``):
        limit each connection and direction; with ``shared``=True, one limit per direction
        for all connections together (one slow link that every stream shares). ``blackhole`` (``direction``="down"): read and
        discard what flows that way (the other way is forwarded): lost ACKs. Counted faults, one-shot, after ``after``
        (default 0) more bytes in ``direction`` ("up" default, or "down") counted over all
        connections, or only over connection number ``conn``: ``close`` (forward exactly
        ``after`` bytes, then close both sides), ``rst`` (the same, then reset both sides:
        SO_LINGER 0), scope ``"all"`` (default) or ``"one"`` (only the connection the
        limit was reached on); ``corrupt`` (flip bit ``bit``=0 of the byte after ``after``
        bytes). A fired counted fault sets the mode back to ``pass``.
        """
        if name not in MODES:
            raise ValueError(f"unknown mode {name!r}; modes: {MODES}")
        with self._cond:
            self._mode = name
            self._params = dict(params)
            self._generation += 1
            if name in _COUNTED:
                self._params.setdefault("direction", "up")
                self._params.setdefault("conn", None)
                self._params.setdefault("scope", "all")
                self._params.setdefault("bit", 0)
                self._remaining = int(self._params.get("after", 0))
                if self._params["direction"] not in ("up", "down"):
                    raise ValueError("direction must be 'up' or 'down'")
            self._cond.notify_all()
            _log(f"mode {name} {params}")
            if name in ("close", "rst") and self._remaining == 0:
                self._fire(name, None, self._params["direction"])
        return self.stats()

    def kill_all(self, action: str = "close") -> dict[str, Any]:
        """Close (or with ``action="rst"`` reset) every current connection now."""
        if action not in ("close", "rst"):
            raise ValueError("action must be 'close' or 'rst'")
        with self._cond:
            for pair in list(self._pairs.values()):
                pair.kill(action)
            self._cond.notify_all()
        return self.stats()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "mode": self._mode,
                "params": dict(self._params),
                "accepted": self._numbers,
                "refused": self._refused,
                "connect_failed": self._connect_failed,
                "active": len(self._pairs),
                "bytes_up": self._bytes["up"],
                "bytes_down": self._bytes["down"],
                "fired": list(self._fired),
                "pairs": [
                    {"number": p.number, "killed": p.killed, **p.bytes}
                    for p in self._pairs.values()
                ],
            }

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for pair in list(self._pairs.values()):
                pair.kill("close")
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once (Linux)
        self._accept_thread.join(5.0)
        deadline = time.monotonic() + 5.0
        for thread in list(self._threads):
            thread.join(max(deadline - time.monotonic(), 0.0))

    # -- accepting ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    client, _ = self.listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stopping:
                        break
                    _log(f"accept failed: {exc}")
                    continue
                self._admit(client)
        finally:
            self.listener.close()

    def _admit(self, client: socket.socket) -> None:
        # All under the lock, connecting included: whoever sees the target accept this
        # connection and then switches the mode finds the pair registered already.
        with self._cond:
            if self._mode == "refuse" or self._stopping:
                self._refused += 1
                client.close()
                return
            try:
                server = socket.create_connection(self.target, timeout=5.0)
            except OSError as exc:
                _log(f"cannot reach target {self.target}: {exc}")
                self._connect_failed += 1
                client.close()
                return
            for sock in (client, server):
                sock.settimeout(_POLL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self._numbers, client, server)
            self._numbers += 1
            self._pairs[pair.number] = pair
            self._threads = [t for t in self._threads if t.is_alive()]
            for direction, src, dst in (("up", client, server), ("down", server, client)):
                thread = threading.Thread(
                    target=self._pump,
                    args=(pair, direction, src, dst),
                    name=f"proxy-{pair.number}-{direction}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    # -- forwarding -----------------------------------------------------------------------

    def _gate(self, pair: _Pair) -> bool:
        """Wait while stalled or frozen; False once the pair is killed."""
        with self._cond:
            while (self._mode == "stall" or self._frozen) and not pair.killed:
                self._cond.wait()
            return not pair.killed

    def _recv_size(self) -> int:
        with self._cond:
            if self._mode == "rate":
                return max(1, min(_BUFFER, int(self._params["bytes_per_second"]) // 50))
        return _BUFFER

    def _filter(
        self, pair: _Pair, direction: str, data: bytearray
    ) -> tuple[bytearray | None, str | None, tuple[str, dict[str, Any], int] | None]:
        """Apply the mode to bytes just read: (bytes to forward, fault to fire, pacing)."""
        with self._cond:
            while (self._mode == "stall" or self._frozen) and not pair.killed:
                self._cond.wait()
            if pair.killed:
                return None, None, None
            mode, params = self._mode, self._params
            fire = None
            if mode == "blackhole" and params.get("direction", "down") == direction:
                data = bytearray()  # read, counted nowhere, forwarded nowhere
            if (
                mode in _COUNTED
                and params["direction"] == direction
                and params["conn"] in (None, pair.number)
            ):
                remaining = self._remaining
                if mode == "corrupt":
                    if remaining < len(data):
                        data[remaining] ^= 1 << int(params["bit"])
                        self._record(mode, pair, direction)
                        self._reset_mode()
                    else:
                        self._remaining -= len(data)
                elif remaining <= len(data):
                    del data[remaining:]
                    fire = mode
                    self._frozen = True
                else:
                    self._remaining -= len(data)
            self._bytes[direction] += len(data)
            pair.bytes[direction] += len(data)
            pacing = (mode, params, self._generation) if mode in ("partial", "rate") else None
            return data, fire, pacing

    def _record(self, action: str, pair: _Pair | None, direction: str) -> None:
        event = {
            "action": action,
            "conn": None if pair is None else pair.number,
            "direction": direction,
            "bytes_up": self._bytes["up"],
            "bytes_down": self._bytes["down"],
            "time": time.monotonic(),
        }
        self._fired.append(event)
        _log(f"fired {event}")

    def _reset_mode(self) -> None:
        self._mode, self._params = "pass", {}
        self._generation += 1
        self._cond.notify_all()

    def _fire(self, action: str, pair: _Pair | None, direction: str) -> None:
        with self._cond:
            if pair is None or self._params.get("scope", "all") == "all":
                victims = list(self._pairs.values())
            else:
                victims = [pair]
            self._record(action, pair, direction)
            for victim in victims:
                victim.kill(action)
            self._frozen = False
            self._reset_mode()

    def _pump(self, pair: _Pair, direction: str, src: socket.socket, dst: socket.socket) -> None:
        rng = random.Random(pair.number * 2 + (direction == "down"))
        rate_state = [-1, 0.0, 0]  # generation, start time, bytes sent since
        try:
            while self._gate(pair):
                try:
                    chunk = src.recv(self._recv_size())
                except TimeoutError:
                    continue
                except OSError:
                    pair.kill("rst")
                    break
                if pair.killed:
                    break
                if not chunk:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    break
                data, fire, pacing = self._filter(pair, direction, bytearray(chunk))
                if data is None:
                    break
                if not self._forward(pair, direction, dst, data, pacing, rng, rate_state):
                    pair.kill("rst")
                    break
                if fire is not None:
                    self._fire(fire, pair, direction)
                    break
        finally:
            if pair.pump_done():
                with self._cond:
                    self._pairs.pop(pair.number, None)

    def _forward(
        self,
        pair: _Pair,
        direction: str,
        dst: socket.socket,
        data: bytearray,
        pacing: tuple[str, dict[str, Any], int] | None,
        rng: random.Random,
        rate_state: list[Any],
    ) -> bool:
        """Send ``data`` as the mode paces it; False when sending failed."""
        view = memoryview(data)
        if pacing is None:
            return self._send(pair, dst, view)
        mode, params, generation = pacing
        if mode == "partial":
            max_piece = int(params.get("max_piece", 7))
            delay = float(params.get("delay", 0.0005))
            every = int(params.get("every", 8))
            pieces = 0
            while view:
                piece = rng.randint(1, max_piece)
                if not self._send(pair, dst, view[:piece]):
                    return False
                view = view[piece:]
                pieces += 1
                if delay and pieces % every == 0 and pair.wake.wait(delay):
                    return True  # killed
            return True
        rate = float(params["bytes_per_second"])
        if params.get("shared"):
            # One link for every connection: each piece takes the next slot on it, in the
            # order the pumps come (an idle link saves no credit for a burst).
            with self._pace_lock:
                start = max(self._link_free[direction], time.monotonic())
                self._link_free[direction] = start + len(view) / rate
            due = start - time.monotonic()
            if due > 0 and pair.wake.wait(due):
                return True  # killed
            return self._send(pair, dst, view)
        if rate_state[0] != generation:
            rate_state[:] = [generation, time.monotonic(), 0]
        if not self._send(pair, dst, view):
            return False
        rate_state[2] += len(view)
        # The link's pace: a paced link is what this mode simulates.
        due = rate_state[1] + rate_state[2] / rate - time.monotonic()
        if due > 0:
            pair.wake.wait(due)
        return True

    @staticmethod
    def _send(pair: _Pair, dst: socket.socket, view: memoryview) -> bool:
        while view:
            if pair.killed:
                return True  # dropped: the pair is going away
            try:
                sent = dst.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultproxy_child")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    out = take_stdout()
    try:
        proxy = Proxy((args.host, args.port), _parse_address(args.target))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        send(out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    send(out, {"ready": True, "address": list(proxy.address)})
    _log(f"listening on {proxy.address}, forwarding to {proxy.target}")
    try:
        serve(
            out,
            {
                "mode": proxy.set_mode,
                "kill_all": proxy.kill_all,
                "stats": proxy.stats,
                "stop": proxy.stop,
            },
        )
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

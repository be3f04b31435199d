"""Child side of the control channel that ``tests.procs.ChildProcess`` speaks.

One JSON object per line. The child writes ``{"ready": true, ...}`` (or ``{"ready": false,
"error": ...}``) first; then, for every request ``{"id": n, "cmd": name, ...arguments}`` read
from stdin, it writes ``{"id": n, "ok": true, "result": ...}`` or ``{"id": n, "ok": false,
"error": ...}``. End of stdin (the parent closed the channel, or died) ends the child, so a
child cannot outlive a crashed test run by more than its own shutdown.

Only replies go to the real stdout: ``take_stdout()`` points file descriptor 1 at stderr, so
a stray print() or library output cannot corrupt the channel. Stderr is the child's log.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

Handler = Callable[..., Any]


def take_stdout() -> TextIO:
    """Return a private, line-buffered handle on the real stdout; fd 1 now goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return out


def send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message, separators=(",", ":")) + "\n")
    out.flush()


def serve(out: TextIO, handlers: dict[str, Handler], *, stop_command: str = "stop") -> None:
    """Answer requests until ``stop_command`` has been answered or stdin ends."""
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        request_id = request.pop("id")
        command = request.pop("cmd")
        try:
            handler = handlers[command]
        except KeyError:
            send(out, {"id": request_id, "ok": False, "error": f"unknown command {command!r}"})
            continue
        try:
            reply = {"id": request_id, "ok": True, "result": handler(**request)}
        except Exception as exc:  # noqa: BLE001 - the parent gets every failure as a reply
            reply = {"id": request_id, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        send(out, reply)
        if command == stop_command:
            return

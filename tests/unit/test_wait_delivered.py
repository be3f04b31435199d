"""MultiStreamReceiver.wait_delivered(count, timeout) checks both arguments through the one
validator: a typed error naming the parameter, never a hang, an OverflowError or a silent
False."""

from __future__ import annotations

import math
import threading
from datetime import timedelta
from typing import Any

import pytest

import dwcp


def _call(receiver: dwcp.MultiStreamReceiver, *args: Any) -> object:
    """What ``wait_delivered(*args)`` returns or raises, from a thread given 10 s (a hang is
    reported, not waited for)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(receiver.wait_delivered(*args))
        except Exception as exc:  # noqa: BLE001 - the test inspects what it raised
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, f"wait_delivered{args!r} still waiting after 10 s"
    return outcome[0]


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((1, math.nan), ValueError, "timeout"),
        ((1, math.inf), ValueError, "timeout"),
        ((1, 1e300), ValueError, "timeout"),
        ((1, -1), ValueError, "timeout"),
        ((1, None), TypeError, "timeout"),
        ((1, "x"), TypeError, "timeout"),
        (("x", 0.1), TypeError, "count"),
        ((True, 0.1), TypeError, "count"),
        ((-1, 0.1), ValueError, "count"),
    ],
)
def test_bad_arguments_are_typed_errors_naming_them(
    args: tuple[object, object], error: type[Exception], name: str
) -> None:
    receiver = dwcp.MultiStreamReceiver(on_message=print)
    raised = _call(receiver, *args)
    assert isinstance(raised, error), raised
    assert str(raised).startswith(name), raised


def test_good_arguments_wait_and_answer() -> None:
    receiver = dwcp.MultiStreamReceiver(on_message=print)
    assert _call(receiver, 0, 0) is True
    assert _call(receiver, 1, 0.0) is False
    assert _call(receiver, 1, timedelta(milliseconds=10)) is False
    assert _call(receiver, 2**70, 0.01) is False

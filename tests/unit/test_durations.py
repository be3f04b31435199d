"""One validator for every duration of every public class: a number of seconds or a
``timedelta``, finite, positive where it must be, never longer than a thread can wait; each
refusal a ``TypeError`` or ``ValueError`` that names the parameter."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import dwcp
from dwcp.cluster import ClusterMember
from dwcp.testing import FakeTransport

Factory = Callable[[str, object], object]


def _kwargs(name: str, value: object) -> dict[str, Any]:
    return {name: value}


def _manager(name: str, value: object) -> object:
    return dwcp.Manager(FakeTransport(), **_kwargs(name, value))


def _policy(name: str, value: object) -> object:
    return dwcp.RecoveryPolicy(**_kwargs(name, value))


def _transport(name: str, value: object) -> object:
    return dwcp.MultiStreamTCPTransport(("127.0.0.1", 9), **_kwargs(name, value))


def _receiver(name: str, value: object) -> object:
    return dwcp.MultiStreamReceiver(on_message=print, **_kwargs(name, value))


def _webhook(name: str, value: object) -> object:
    return dwcp.WebhookNotifier("http://127.0.0.1:9/hook", **_kwargs(name, value))


def _member(name: str, value: object) -> object:
    return ClusterMember("redis://127.0.0.1:9", "n1", **_kwargs(name, value))


# (factory, parameter, whether zero is allowed)
DURATIONS: list[tuple[Factory, str, bool]] = [
    (_manager, "health_interval", False),
    (_manager, "health_check_timeout", False),
    (_manager, "initial_backoff", True),
    (_manager, "reset_timeout", False),
    (_manager, "delivery_timeout", False),
    (_manager, "delivery_max_block", True),
    (_policy, "initial_backoff", True),
    (_policy, "jitter", True),
    (_policy, "cycle_window", False),
    (_policy, "stable_period", False),
    (_transport, "send_timeout", False),
    (_transport, "connect_timeout", False),
    (_transport, "keepalive_interval", False),
    (_receiver, "handshake_timeout", False),
    (_receiver, "join_timeout", False),
    (_receiver, "frame_timeout", False),
    (_webhook, "timeout", False),
    (_webhook, "retry_backoff", True),
    (_member, "interval", False),
]
IDS = [f"{f.__name__.strip('_')}-{name}" for f, name, _ in DURATIONS]


@pytest.mark.parametrize(("factory", "name", "zero"), DURATIONS, ids=IDS)
def test_a_timedelta_is_accepted_wherever_seconds_are(
    factory: Factory, name: str, zero: bool
) -> None:
    factory(name, timedelta(seconds=2))


@pytest.mark.parametrize(("factory", "name", "zero"), DURATIONS, ids=IDS)
@pytest.mark.parametrize(
    "bad", [math.inf, math.nan, -1.0, timedelta(seconds=-1), 10.0 * threading.TIMEOUT_MAX]
)
def test_a_duration_a_thread_cannot_wait_is_a_value_error_naming_it(
    factory: Factory, name: str, zero: bool, bad: object
) -> None:
    with pytest.raises(ValueError, match=name):
        factory(name, bad)


@pytest.mark.parametrize(("factory", "name", "zero"), DURATIONS, ids=IDS)
def test_zero_is_refused_where_it_makes_no_sense(factory: Factory, name: str, zero: bool) -> None:
    if zero:
        factory(name, 0)
    else:
        with pytest.raises(ValueError, match=name):
            factory(name, 0)


@pytest.mark.parametrize(("factory", "name", "zero"), DURATIONS, ids=IDS)
@pytest.mark.parametrize("bad", ["10", True, None, [1]])
def test_a_duration_of_the_wrong_type_is_a_type_error_naming_it(
    factory: Factory, name: str, zero: bool, bad: Any
) -> None:
    if bad is None and (factory, name) in {(_transport, "keepalive_interval")}:
        pytest.skip("None turns the keepalive off")
    with pytest.raises(TypeError, match=name):
        factory(name, bad)


# Each Manager duration's documented maximum (README, "Invalid values"): one day for a pass's
# interval and check timeout, one week for the others.
MANAGER_MAXIMUMS = [
    ("health_interval", 86400.0),
    ("health_check_timeout", 86400.0),
    ("initial_backoff", 7 * 86400.0),
    ("reset_timeout", 7 * 86400.0),
    ("delivery_timeout", 7 * 86400.0),
    ("delivery_max_block", 7 * 86400.0),
]


@pytest.mark.parametrize(("name", "maximum"), MANAGER_MAXIMUMS)
def test_a_manager_duration_past_its_maximum_is_a_value_error_naming_it(
    name: str, maximum: float
) -> None:
    _manager(name, maximum)
    _manager(name, timedelta(seconds=maximum))
    for bad in (maximum * 1.001, threading.TIMEOUT_MAX / 3.1, threading.TIMEOUT_MAX):
        with pytest.raises(ValueError, match=f"{name} must be at most"):
            _manager(name, bad)


def test_stop_with_the_longest_check_timeout_ends_idle_without_leaking_threads() -> None:
    manager = dwcp.Manager(FakeTransport(), health_interval=86400, health_check_timeout=86400)
    manager.start()
    manager.stop()  # its joins' deadline is timeout + 1 s: a day, which a thread can wait
    assert not manager.is_started
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dwcp-")]
    # And the deadline arithmetic holds regardless of the validator: a timeout it would
    # refuse (set behind its back) makes no OverflowError and leaks no thread.
    manager._monitor.timeout = threading.TIMEOUT_MAX
    manager.start()
    manager.stop()
    assert not manager.is_started
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dwcp-")]

"""What dwcp's breaker adapter relies on in pybreaker: these fail if a pybreaker release changes it.

The adapter (dwcp/_breaker.py) drives pybreaker's state objects directly instead of
``CircuitBreaker.call()``, so the private names it uses are pinned here, one test each.
"""

from __future__ import annotations

import threading
from importlib.metadata import version

import pybreaker
import pytest
from freezegun import freeze_time


class _Seen(pybreaker.CircuitBreakerListener):
    def __init__(self, lock_owned: list[bool]) -> None:
        self.changes: list[tuple[str | None, str]] = []
        self._owned = lock_owned

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self.changes.append((old_state.name if old_state else None, new_state.name))
        self._owned.append(cb._lock._is_owned())  # type: ignore[attr-defined]


def _breaker(fail_max: int = 2) -> tuple[pybreaker.CircuitBreaker, _Seen, list[bool]]:
    owned: list[bool] = []
    seen = _Seen(owned)
    cb = pybreaker.CircuitBreaker(
        fail_max=fail_max, reset_timeout=30, listeners=[seen], throw_new_error_on_trip=False
    )
    return cb, seen, owned


def test_the_pinned_version_is_the_one_installed() -> None:
    assert version("pybreaker").split(".")[:2] == ["1", "4"]


def test_the_breaker_lock_is_a_reentrant_lock() -> None:
    cb, _, _ = _breaker()
    assert isinstance(cb._lock, type(threading.RLock()))
    with cb._lock, cb._lock:  # re-entered by half_open() and the state setter
        cb.half_open()


def test_handle_error_counts_and_trips_at_fail_max_reraising_the_failure_itself() -> None:
    cb, seen, owned = _breaker(fail_max=2)
    failure = ConnectionError("down")
    with cb._lock:
        cb.state._handle_error(failure, reraise=False)  # one failure: counted, no raise
    assert cb.fail_counter == 1 and cb.current_state == "closed"
    with cb._lock, pytest.raises(ConnectionError) as info:
        cb.state._handle_error(failure, reraise=False)  # the trip re-raises even so
    assert info.value is failure
    assert cb.current_state == "open" and seen.changes == [("closed", "open")]
    assert owned == [True]  # listeners run under pybreaker's lock


def test_a_failed_trial_reopens_and_a_good_one_closes() -> None:
    cb, seen, _ = _breaker(fail_max=1)
    cb.half_open()
    trial_failure = TimeoutError("still down")
    with cb._lock, pytest.raises(TimeoutError):
        cb.state._handle_error(trial_failure, reraise=False)
    assert cb.current_state == "open"
    cb.half_open()
    with cb._lock:
        cb.state._handle_success()
    assert cb.current_state == "closed"
    assert seen.changes[-2:] == [("open", "half-open"), ("half-open", "closed")]


def test_handle_success_resets_the_failure_count() -> None:
    cb, _, _ = _breaker(fail_max=5)
    with cb._lock:
        cb.state._handle_error(OSError("x"), reraise=False)
        cb.state._handle_success()
    assert cb.fail_counter == 0


def test_excluded_exceptions_count_as_successes_so_the_adapter_never_passes_them() -> None:
    cb = pybreaker.CircuitBreaker(fail_max=1, exclude=[ValueError])
    cb.half_open()
    with cb._lock:
        cb.state._handle_error(ValueError("caller bug"), reraise=False)
    assert cb.current_state == "closed"  # why caller errors take the release path instead


def test_open_stamps_opened_at_in_utc_and_state_follows_the_storage() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    seen = _Seen([])
    cb = pybreaker.CircuitBreaker(fail_max=2, state_storage=storage, listeners=[seen])
    with freeze_time("2026-01-01 00:00:00"):
        cb.open()
    assert storage.opened_at is not None and storage.opened_at.utcoffset() is not None
    assert storage.opened_at.isoformat() == "2026-01-01T00:00:00+00:00"
    storage.state = pybreaker.STATE_CLOSED  # another process wrote it
    assert cb.state.name == "closed"  # adopted on the next read, with a notification
    assert seen.changes[-1] == ("open", "closed")


def test_closed_state_on_failure_decides_from_the_storage_counter() -> None:
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    cb = pybreaker.CircuitBreaker(fail_max=3, state_storage=storage, throw_new_error_on_trip=False)
    for _ in range(3):
        storage.increment_counter()  # failures other processes counted
    failure = OSError("x")
    with cb._lock, pytest.raises(OSError):
        cb.state.on_failure(failure)
    assert cb.current_state == "open"

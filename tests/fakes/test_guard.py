"""Guarded calls (``manager.call``, ``@manager.guard``): what counts as a failure."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import dwcp
from dwcp.testing import FakeTransport

MakeManager = Callable[..., dwcp.Manager]


class QuoteServiceDown(Exception):
    """A client library's own error, not an OSError (as httpx's and redis-py's are not)."""


class QuoteNotFound(Exception):
    """The caller asked for something that does not exist: says nothing about the peer."""


def raiser(error: BaseException) -> Callable[[], None]:
    def fail() -> None:
        raise error

    return fail


def test_named_exception_types_count_and_open_the_breaker(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), call_failures=(QuoteServiceDown,), max_failures=2)
    manager.start()
    for _ in range(2):
        with pytest.raises(QuoteServiceDown):  # the client's own exception, unchanged
            manager.call(raiser(QuoteServiceDown("503 from the quote service")))
    assert manager.circuit_breaker_state == "open"
    with pytest.raises(dwcp.CircuitOpenError):
        manager.call(raiser(QuoteServiceDown("never raised: rejected first")))


def test_named_types_replace_the_default(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), call_failures=QuoteServiceDown, max_failures=1)
    manager.start()
    for _ in range(3):  # an OSError counts by default, but not when the types are named
        with pytest.raises(ConnectionRefusedError):
            manager.call(raiser(ConnectionRefusedError("refused")))
    assert manager.circuit_breaker_state == "closed"


def test_a_predicate_decides_what_counts(make_manager: MakeManager) -> None:
    seen: list[Exception] = []

    def is_outage(error: Exception) -> bool:
        seen.append(error)
        return not isinstance(error, QuoteNotFound)

    manager = make_manager(FakeTransport(), call_failures=is_outage, max_failures=2)
    manager.start()
    not_found = QuoteNotFound("EURXXX")
    for _ in range(3):
        with pytest.raises(QuoteNotFound):
            manager.call(raiser(not_found))
    assert manager.circuit_breaker_state == "closed"
    down = QuoteServiceDown("503")
    for _ in range(2):
        with pytest.raises(QuoteServiceDown):
            manager.call(raiser(down))
    assert manager.circuit_breaker_state == "open"
    assert seen == [not_found] * 3 + [down] * 2


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(1)])
def test_interrupts_never_count_even_for_a_predicate_that_says_yes(
    make_manager: MakeManager, interrupt: BaseException
) -> None:
    asked: list[BaseException] = []

    def everything(error: BaseException) -> bool:
        asked.append(error)
        return True

    manager = make_manager(FakeTransport(), call_failures=everything, max_failures=1)
    manager.start()
    with pytest.raises(type(interrupt)):
        manager.call(raiser(interrupt))
    assert manager.circuit_breaker_state == "closed" and asked == []


def test_a_predicate_that_raises_releases_the_call_and_its_error_propagates(
    make_manager: MakeManager,
) -> None:
    def broken(error: Exception) -> bool:
        raise RuntimeError("bug in the predicate")

    manager = make_manager(FakeTransport(), call_failures=broken, max_failures=1)
    manager.start()
    with pytest.raises(RuntimeError, match="bug in the predicate") as info:
        manager.call(raiser(QuoteServiceDown("503")))
    assert isinstance(info.value.__context__, QuoteServiceDown)
    assert manager.circuit_breaker_state == "closed"
    assert manager.call(divmod, 7, 2) == (3, 1)


def test_sends_keep_their_own_rule(make_manager: MakeManager) -> None:
    transport = FakeTransport()
    manager = make_manager(transport, call_failures=(QuoteServiceDown,), max_failures=1)
    manager.start()
    transport.fail_sends = ConnectionResetError("reset")
    with pytest.raises(dwcp.TransportError):
        manager.send_with_circuit_breaker(b"x")
    assert manager.circuit_breaker_state == "open"


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ([QuoteServiceDown], TypeError, "call_failures must be an exception class, a tuple"),
        ("ConnectionError", TypeError, "call_failures must be an exception class, a tuple"),
        (42, TypeError, "got int"),
        ((QuoteServiceDown, "OSError"), TypeError, r"call_failures\[1\] must be an exception"),
        (int, TypeError, "call_failures must be an exception class.*got the class int"),
        (KeyboardInterrupt, TypeError, "KeyboardInterrupt.*never count"),
        ((OSError, SystemExit), TypeError, "SystemExit.*never count"),
        ((), ValueError, "call_failures must name at least one exception class"),
    ],
)
def test_bad_call_failures_are_refused_by_name(value: object, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        dwcp.Manager(call_failures=value)  # type: ignore[arg-type]

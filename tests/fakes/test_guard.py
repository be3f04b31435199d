"""Guarded calls (``manager.call``, ``@manager.guard``): what counts as a failure, async
functions, and the calls' own counters and messages."""

from __future__ import annotations

import asyncio
import inspect
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

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


# -- async def ----------------------------------------------------------------------------------


def test_guard_keeps_an_async_function_a_coroutine_function(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())

    @manager.guard
    async def fetch(symbol: str) -> str:
        return symbol

    assert inspect.iscoroutinefunction(fetch) and fetch.__name__ == "fetch"
    manager.start()
    assert asyncio.run(fetch("EURUSD")) == "EURUSD"


def test_an_object_with_an_async_call_method_is_guarded_as_an_async_function(
    make_manager: MakeManager,
) -> None:
    """README: on an ``async def`` function the guard returns an ``async def`` function; a
    client object whose ``__call__`` is ``async def`` is one too, decided at decoration."""
    manager = make_manager(FakeTransport(), call_failures=QuoteServiceDown, max_failures=2)

    class QuoteClient:
        async def __call__(self, symbol: str) -> str:
            await asyncio.sleep(0)
            if symbol == "down":
                raise QuoteServiceDown(symbol)
            return symbol

    fetch = manager.guard(QuoteClient())
    assert inspect.iscoroutinefunction(fetch)
    manager.start()

    async def main() -> None:
        assert await fetch("EURUSD") == "EURUSD"
        for _ in range(2):
            with pytest.raises(QuoteServiceDown):
                await fetch("down")
        assert manager.circuit_breaker_state == "open"

    asyncio.run(main())


def test_failures_raised_at_the_await_count_and_open_the_breaker(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(FakeTransport(), call_failures=QuoteServiceDown, max_failures=2)
    manager.start()
    entered: list[str] = []

    @manager.guard
    async def fetch(symbol: str) -> str:
        entered.append(symbol)
        await asyncio.sleep(0)  # the failure comes after a suspension, as a client's would
        raise QuoteServiceDown(symbol)

    async def main() -> None:
        for symbol in ("A", "B"):
            with pytest.raises(QuoteServiceDown):
                await fetch(symbol)
        assert manager.circuit_breaker_state == "open"
        with pytest.raises(dwcp.CircuitOpenError):
            await fetch("C")

    asyncio.run(main())
    assert entered == ["A", "B"]  # the rejected call never ran


def guarded_quote(manager: dwcp.Manager) -> Callable[..., Coroutine[Any, Any, str]]:
    """An async call that fails at once, or says it is running and answers when told."""

    @manager.guard
    async def quote(
        fail: bool = False,
        running: asyncio.Event | None = None,
        answer: asyncio.Event | None = None,
    ) -> str:
        if fail:
            raise ConnectionResetError("reset")
        if running is not None and answer is not None:
            running.set()
            await answer.wait()
        return "quote"

    return quote


def test_the_half_open_trial_lasts_until_its_await_returns(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=1)
    manager.start()
    quote = guarded_quote(manager)

    async def main() -> None:
        with pytest.raises(ConnectionResetError):
            await quote(fail=True)
        assert manager.circuit_breaker_state == "open"
        assert manager.attempt_component_recovery("transport")  # verified: half-open
        running, answer = asyncio.Event(), asyncio.Event()
        trial = asyncio.create_task(quote(running=running, answer=answer))
        await running.wait()
        with pytest.raises(dwcp.CircuitOpenError, match="trial"):
            await quote()  # the trial is still awaiting its answer
        answer.set()
        assert await trial == "quote"
        assert manager.circuit_breaker_state == "closed"  # recorded after the await

    asyncio.run(main())


def test_a_cancelled_trial_does_not_count_and_frees_the_trial(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=1)
    manager.start()
    quote = guarded_quote(manager)

    async def main() -> None:
        with pytest.raises(ConnectionResetError):
            await quote(fail=True)
        assert manager.attempt_component_recovery("transport")
        running = asyncio.Event()
        trial = asyncio.create_task(quote(running=running, answer=asyncio.Event()))
        await running.wait()
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert manager.circuit_breaker_state == "half-open"
        assert await quote() == "quote"  # the next call is the trial, and closes the breaker
        assert manager.circuit_breaker_state == "closed"

    asyncio.run(main())


def test_an_async_guard_before_start_is_not_started(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())

    @manager.guard
    async def fetch() -> str:
        return "quote"

    with pytest.raises(dwcp.DWCPError) as info:
        asyncio.run(fetch())
    assert info.value.code == "NOT_STARTED"


def test_generator_functions_are_refused_at_decoration(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport())

    async def stream() -> AsyncIterator[int]:
        yield 1

    def chunks() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async generator function stream"):
        manager.guard(stream)
    with pytest.raises(TypeError, match="generator function chunks"):
        manager.guard(chunks)


def test_call_refuses_a_coroutine_it_could_not_guard(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=1)
    manager.start()
    ran: list[int] = []

    async def fetch() -> None:
        ran.append(1)
        raise ConnectionResetError("reset")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine was never awaited" would be a bug here
        with pytest.raises(TypeError, match=r"returned a coroutine.*@manager\.guard"):
            _ = manager.call(fetch)  # the coroutine it would return
        with pytest.raises(TypeError, match="returned a coroutine"):
            _ = manager.call(lambda: fetch())
    assert ran == [] and manager.circuit_breaker_state == "closed"


# -- counters and messages ----------------------------------------------------------------------


def test_calls_have_their_own_counters_and_messages(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=2)
    manager.start()
    assert manager.call(divmod, 7, 2) == (3, 1)
    with pytest.raises(KeyError):  # the caller's error: counted nowhere
        manager.call({}.__getitem__, "missing")
    for _ in range(2):
        with pytest.raises(ConnectionResetError):
            manager.call(raiser(ConnectionResetError("reset")))
    with pytest.raises(dwcp.CircuitOpenError) as call_rejected:
        manager.call(divmod, 1, 1)
    assert str(call_rejected.value) == "[CIRCUIT_OPEN] circuit breaker is open; call rejected"
    with pytest.raises(dwcp.CircuitOpenError) as send_rejected:
        manager.send_with_circuit_breaker(b"x")
    assert str(send_rejected.value) == "[CIRCUIT_OPEN] circuit breaker is open; send rejected"
    metrics = manager.metrics()
    assert (metrics.calls, metrics.call_errors, metrics.call_rejections) == (1, 2, 1)
    assert (metrics.sends, metrics.send_errors) == (0, 0)
    assert metrics.breaker_rejections == 2  # the breaker's own count: sends and calls


def test_async_calls_are_counted_as_calls(make_manager: MakeManager) -> None:
    manager = make_manager(FakeTransport(), max_failures=1)
    manager.start()
    quote = guarded_quote(manager)

    async def main() -> None:
        assert await quote() == "quote"
        with pytest.raises(ConnectionResetError):
            await quote(fail=True)
        with pytest.raises(dwcp.CircuitOpenError, match="call rejected"):
            await quote()

    asyncio.run(main())
    metrics = manager.metrics()
    assert (metrics.calls, metrics.call_errors, metrics.call_rejections) == (1, 1, 1)


def test_calls_from_every_thread_are_counted_and_outlive_their_threads(
    make_manager: MakeManager,
) -> None:
    manager = make_manager(FakeTransport())
    manager.start()
    start = threading.Barrier(4)

    def caller() -> None:
        start.wait(10)
        for _ in range(500):
            manager.call(divmod, 7, 2)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    manager.call(divmod, 7, 2)
    assert manager.metrics().calls == 4 * 500 + 1


def test_guard_refuses_what_is_not_callable_at_decoration(make_manager: MakeManager) -> None:
    manager = make_manager()
    for bad in (5, None, "fn"):
        with pytest.raises(TypeError, match="@guard needs a callable"):
            manager.guard(bad)  # type: ignore[arg-type]


def test_call_refuses_a_generator_function_it_could_not_guard(make_manager: MakeManager) -> None:
    manager = make_manager()
    manager.start()

    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="returned a generator"):
        manager.call(numbers)
    assert manager.metrics().calls == 0


def test_by_default_oserror_and_transport_error_count_but_not_started_does_not(
    make_manager: MakeManager,
) -> None:
    """README.md, "Quick start": "By default the rule is the sends' rule: `OSError` and
    `TransportError` count as failures (except `NOT_STARTED`: this process not connected
    yet), anything else is the caller's and does not count." """
    manager = make_manager(FakeTransport(), max_failures=2)
    manager.start()
    not_started = dwcp.TransportError("not connected yet", code="NOT_STARTED")
    for error in (not_started, QuoteNotFound("EURUSD"), ValueError("bad symbol")) * 3:
        with pytest.raises(type(error)) as raised:
            manager.call(raiser(error))
        assert raised.value is error  # the call's own exception, unchanged
    assert manager.circuit_breaker_state == "closed"
    assert manager.metrics().call_errors == 0
    reset = dwcp.TransportError("reset by peer", code="TRANSPORT_ERROR")
    with pytest.raises(dwcp.TransportError):
        manager.call(raiser(reset))
    with pytest.raises(OSError):
        manager.call(raiser(TimeoutError("timed out")))  # an OSError
    assert manager.circuit_breaker_state == "open"
    assert manager.metrics().call_errors == 2


def test_an_async_call_is_admitted_when_awaited_not_when_called(
    make_manager: MakeManager,
) -> None:
    """README.md, "Quick start": "`@manager.guard` returns an `async def` function [...]:
    each call is admitted when awaited"."""
    manager = make_manager(FakeTransport(), max_failures=1)
    manager.start()
    quote = guarded_quote(manager)

    async def main() -> None:
        closed_call = quote()  # made while closed...
        with pytest.raises(ConnectionResetError):
            await quote(fail=True)  # ...then the breaker opens
        assert manager.circuit_breaker_state == "open"
        open_call = quote()  # made while open: nothing is admitted or refused yet
        assert manager.metrics().call_rejections == 0
        with pytest.raises(dwcp.CircuitOpenError):
            await open_call
        with pytest.raises(dwcp.CircuitOpenError):
            await closed_call  # admitted when awaited: now, while open
        assert manager.metrics().call_rejections == 2

    asyncio.run(main())

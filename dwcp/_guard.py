"""Guarded calls: admit through the breaker, run the I/O with no lock held, record the result.

``GuardedCalls`` holds the manager's public guarded methods (the send's hot path among them);
``Guard`` their slow paths, counters and ``call()``.

A send's failures are classified by ``PEER_FAILURES``: ``OSError`` and ``TransportError`` are
the peer or the network failing and count against the breaker; anything else is the caller's
and does not.  A call's are classified by the manager's ``call_failures`` (``failure_test``),
``PEER_FAILURES`` by default, since the clients applications guard (httpx, redis-py) raise
their own exceptions.  ``KeyboardInterrupt``, ``SystemExit`` and other ``BaseException``
that are not an ``Exception`` never count.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import wraps
from time import perf_counter
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from dwcp._breaker import NOT_EVIDENCE, Breaker
from dwcp._components import Transport
from dwcp._errors import DWCPError, TransportError
from dwcp._events import SendRejected, _Dispatcher
from dwcp._slots import PEER_FAILURES
from dwcp._status import Counters, SendTallies, ThreadCount
from dwcp._validation import describe

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    P = ParamSpec("P")

__all__ = ["CallFailures", "Guard", "GuardedCalls", "failure_test"]

R = TypeVar("R")
#: What ``Manager(call_failures=...)`` accepts: exception classes, or a predicate.
CallFailures = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], object]
#: A send is timed when its thread's success count is a multiple of SEND_SAMPLE (a power of
#: two: the test is a mask), so about one in SEND_SAMPLE is.
SEND_SAMPLE = 64
#: One timed send in SUSPICION_SAMPLE // SEND_SAMPLE also feeds the transport's suspicion.
SUSPICION_SAMPLE = 128
_BYTES_LIKE = (bytes, bytearray, memoryview)


def failure_test(call_failures: object) -> Callable[[Exception], object]:
    """The test a call's exception must pass to count as a peer failure.

    ``call_failures`` is None (``OSError`` and ``TransportError``), an ``Exception`` subclass,
    a tuple of them, or a predicate called with the exception.  Anything else raises
    ``TypeError`` (``ValueError`` for an empty tuple), naming ``call_failures``.
    """
    if call_failures is None:
        types: tuple[type[BaseException], ...] = PEER_FAILURES
    elif isinstance(call_failures, type):
        types = (_exception_class("call_failures", call_failures),)
    elif isinstance(call_failures, tuple):
        if not call_failures:
            raise ValueError("call_failures must name at least one exception class")
        types = tuple(
            _exception_class(f"call_failures[{i}]", t) for i, t in enumerate(call_failures)
        )
    elif callable(call_failures):
        return call_failures
    else:
        raise TypeError(
            "call_failures must be an exception class, a tuple of them, or a predicate "
            f"called with the exception, got {type(call_failures).__name__}"
        )
    return lambda error: isinstance(error, types)


def _exception_class(name: str, value: object) -> type[Exception]:
    if not isinstance(value, type):
        raise TypeError(f"{name} must be an exception class, got {type(value).__name__}")
    if issubclass(value, BaseException) and not issubclass(value, Exception):
        raise TypeError(
            f"{name} is {value.__name__}, which is not an Exception: interrupts and exits "
            "never count as peer failures"
        )
    if not issubclass(value, Exception):
        raise TypeError(
            f"{name} must be an exception class (or a predicate), got the class {value.__name__}"
        )
    return value


def describe_callable(fn: object) -> str:
    """``fn``'s name for messages, or its type's name."""
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


class Guard:
    """Guarded calls through one breaker, and the slow paths of the guarded send (whose hot
    path is ``GuardedCalls.send_with_circuit_breaker``)."""

    def __init__(
        self,
        breaker: Breaker,
        events: _Dispatcher,
        lock: threading.RLock,
        counters: Counters,
        on_send: Callable[[float, bool], None] | None = None,
        counts: Callable[[Exception], object] | None = None,
    ) -> None:
        self._on_send = on_send
        #: Whether a call's exception counts as a peer failure (``failure_test``).
        self._counts = counts if counts is not None else failure_test(None)
        self._breaker = breaker
        self._events = events
        self._lock = lock
        self._counters = counters
        self.tallies = SendTallies()
        #: Guarded calls that returned: per thread, so a call takes no lock to count.
        self.calls = ThreadCount()

    def rejected(self) -> None:
        """A send or call the breaker refused: tell the listeners (``SendRejected``)."""
        if self._events.active:
            self._events.publish(SendRejected(self._breaker.state))

    def send_failed(
        self, ticket: int, exc: BaseException, tally: list[float], began: float | None
    ) -> None:
        """Account a send the peer failed, timed from ``began`` when it was sampled."""
        seconds = 0.0
        if began is not None:
            seconds = perf_counter() - began
            self.tallies.observe(tally, seconds)
        self._breaker.record_failure(ticket, exc)
        with self._lock:
            self._counters.send_errors += 1
        if self._on_send is not None:
            self._on_send(seconds, False)  # every failure raises the suspicion

    def send_timed(self, tally: list[float], seconds: float) -> None:
        """Record a sampled successful send's duration; a sparser sample feeds the suspicion."""
        self.tallies.observe(tally, seconds)
        # The suspicion update takes the manager's lock (about 3 us).
        if not tally[0] % SUSPICION_SAMPLE and self._on_send is not None:
            self._on_send(seconds, True)

    def call(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """``fn(*args, **kwargs)``; its exceptions propagate unchanged."""
        ticket = self._admit()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            self._settle(ticket, exc)
            raise
        except BaseException:
            self._breaker.release(ticket)
            raise
        if isinstance(result, (CoroutineType, GeneratorType, AsyncGeneratorType)):
            # An async function called without its await, or a generator: the call would be
            # over before its I/O began, so its failures could never count.
            if not isinstance(result, AsyncGeneratorType):  # never started: nothing to close
                result.close()  # never run, on purpose: no "never awaited" warning
            self._breaker.release(ticket)
            kind = "a coroutine" if isinstance(result, CoroutineType) else "a generator"
            raise TypeError(
                f"{describe_callable(fn)} returned {kind}: call() cannot guard the work "
                "done as it is awaited or iterated; guard an async function with "
                "@manager.guard and await it, or guard the calls a generator makes"
            )
        self._breaker.record_success(ticket)
        self.calls.add()
        return result

    async def call_async(
        self, fn: Callable[..., Awaitable[R]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        """``await fn(*args, **kwargs)``: admitted before, recorded after the await."""
        ticket = self._admit()
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self._settle(ticket, exc)
            raise
        except BaseException:  # asyncio.CancelledError among them: says nothing of the peer
            self._breaker.release(ticket)
            raise
        self._breaker.record_success(ticket)
        self.calls.add()
        return result

    def _settle(self, ticket: int, error: Exception) -> None:
        """Count ``error`` against the breaker if the call's failure test says so, else
        release the call; a test that raises releases it and its error propagates.

        A code the breaker never counts (``NOT_STARTED``...) is released whatever the test
        says, so ``call_errors`` stays the count of calls that counted against the breaker.
        """
        try:
            counts = self._counts(error)
        except BaseException:
            self._breaker.release(ticket)
            raise
        if counts and getattr(error, "code", None) not in NOT_EVIDENCE:
            self._breaker.record_failure(ticket, error)
            with self._lock:
                self._counters.call_errors += 1
        else:
            self._breaker.release(ticket)

    def _admit(self) -> int:
        """Admit a guarded call, or count its rejection, tell the listeners and raise."""
        try:
            return self._breaker.admit("call")
        except DWCPError:
            with self._lock:
                self._counters.call_rejections += 1
            self.rejected()
            raise


class GuardedCalls:
    """The manager's guarded calls: ``send_with_circuit_breaker``, ``call`` and ``guard``.

    A mixin of ``Manager`` rather than a collaborator it calls: a 1 KiB send costs a few
    microseconds, and a Python frame between the caller and the transport is a measurable
    share of that (``benchmarks/instructions.py``).  The manager sets these attributes.
    """

    _sending: Transport | None  # the transport while the manager is started, else None
    _started: bool
    _breaker: Breaker
    _guard: Guard
    _tally: threading.local  # .value: the calling thread's SendTallies tally

    def send_with_circuit_breaker(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` through the transport, guarded by the circuit breaker.

        Raises ``CircuitOpenError`` when the breaker rejects the call, ``TransportError`` when
        the transport fails (counted by the breaker, unless its code is ``NOT_STARTED``: a
        transport that recovery has not restarted yet says nothing about the peer),
        ``DWCPError`` (``NOT_STARTED``, ``NO_TRANSPORT``) and ``TypeError`` for calls that
        never reach the transport.
        """
        transport = self._sending
        if transport is None:
            raise self._not_sending()
        if not isinstance(data, _BYTES_LIKE):
            try:
                data = memoryview(data)  # another bytes-like object: an array, say
            except TypeError:
                raise TypeError(
                    f"data must be bytes-like (bytes, bytearray, memoryview or another object "
                    f"exporting a buffer), got {type(data).__name__}"
                ) from None
        # Admit, send with no lock held, record, tally.  Each thread's tally has a single
        # writer, so no lock.  A send is timed into the histogram when the thread's success
        # count is a multiple of SEND_SAMPLE: a steady sample gives the distribution, where
        # timing every send cost about a tenth of a 1 KiB send.
        breaker = self._breaker
        try:
            ticket = breaker.admit()
        except DWCPError:
            self._guard.rejected()
            raise
        try:
            tally = self._tally.value
        except AttributeError:
            tally = self._guard.tallies.new_tally()
        began = None if tally[0] % SEND_SAMPLE else perf_counter()
        try:
            transport.send(data)
        except PEER_FAILURES as exc:
            self._raise_send_failure(ticket, exc, tally, began)
        except BaseException:
            breaker.release(ticket)
            raise
        breaker.record_success(ticket)
        if began is not None:
            self._guard.send_timed(tally, perf_counter() - began)
        tally[0] += 1
        tally[1] += data.nbytes if type(data) is memoryview else len(data)

    def _send_run(self, messages: Sequence[bytes]) -> int:
        """For ``deliver()``'s thread: queue the first of ``messages`` that the transport
        takes at once (``MultiStreamTCPTransport._queue_for_delivery``) as one call through
        the breaker, and return how many; each counts as a send. 0: nothing was queued, and
        the call was released uncounted (the next message needs a send of its own). Admitted
        as a half-open trial, it queues one message at most. Raises as
        ``send_with_circuit_breaker`` does."""
        transport = self._sending
        if transport is None:
            raise self._not_sending()
        breaker = self._breaker
        try:
            ticket = breaker.admit()
        except DWCPError:
            self._guard.rejected()
            raise
        if not breaker.closed:
            messages = messages[:1]  # a half-open trial: one message, as one send
        try:
            tally = self._tally.value
        except AttributeError:
            tally = self._guard.tallies.new_tally()
        try:
            queued: int = transport._queue_for_delivery(messages)  # type: ignore[attr-defined]
        except PEER_FAILURES as exc:
            self._raise_send_failure(ticket, exc, tally, None)
        except BaseException:
            breaker.release(ticket)
            raise
        if not queued:
            breaker.release(ticket)  # nothing was tried: no evidence either way
            return 0
        breaker.record_success(ticket)
        tally[0] += queued
        tally[1] += sum(map(len, messages[:queued]))
        return queued

    def _raise_send_failure(
        self, ticket: int, exc: BaseException, tally: list[float], began: float | None
    ) -> NoReturn:
        """Account a send (or run) the peer failed and raise it as a ``TransportError``.

        The breaker decides what counts: a transport that recovery closed and has not
        restarted yet fails with NOT_STARTED, which it releases without counting.
        """
        self._guard.send_failed(ticket, exc, tally, began)
        if isinstance(exc, TransportError):
            raise exc
        raise TransportError(f"send failed: {describe(exc)}") from exc

    def _not_sending(self) -> DWCPError:
        if not self._started:
            return DWCPError("manager is not started", code="NOT_STARTED")
        return DWCPError("manager has no transport to send through", code="NO_TRANSPORT")

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Run ``fn(*args, **kwargs)`` guarded by the breaker, as sends are.

        Its exceptions propagate unchanged; those the manager's ``call_failures`` names
        (default: ``OSError`` and ``TransportError``) count as failures, others do not.
        Raises ``CircuitOpenError`` when rejected and ``DWCPError`` (``NOT_STARTED``) before
        ``start()``.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not self._started:
            raise DWCPError("manager is not started", code="NOT_STARTED")
        return self._guard.call(fn, args, kwargs)

    def guard(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` so that every call goes through ``call()``.

        An ``async def`` function stays one (``inspect.iscoroutinefunction`` is true of the
        wrapper): each call is admitted when awaited and recorded when its await ends. So
        does an object whose class defines ``async def __call__``.
        Generator functions, sync or async, raise ``TypeError``: the guard would see only the
        generator's creation, never the work done as it is iterated. So does anything not
        callable, at decoration rather than at the first call.
        """
        if not callable(fn):
            raise TypeError(f"@guard needs a callable, got {type(fn).__name__}")
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            kind = "async generator" if inspect.isasyncgenfunction(fn) else "generator"
            raise TypeError(
                f"cannot guard {kind} function {describe_callable(fn)}: its work runs as it "
                "is iterated, after the call returned; guard the calls it makes instead"
            )
        async_object = _has_async_call(fn)
        if inspect.iscoroutinefunction(fn) or async_object:
            coroutine_function = cast("Callable[..., Awaitable[Any]]", fn)

            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                if not self._started:
                    raise DWCPError("manager is not started", code="NOT_STARTED")
                return await self._guard.call_async(coroutine_function, args, kwargs)

            if async_object:
                # Not wraps(): it would copy the object's attributes onto the function.
                guarded_async.__wrapped__ = fn  # type: ignore[attr-defined]
                guarded_async.__doc__ = type(fn).__call__.__doc__
            else:
                guarded_async = wraps(fn)(guarded_async)
            return cast("Callable[P, R]", guarded_async)

        @wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        return guarded


def _has_async_call(fn: object) -> bool:
    """Whether ``fn`` is an instance (not a function or class) whose ``__call__`` is an
    ``async def`` method: awaiting its calls is where its work, and its failures, happen."""
    if inspect.isroutine(fn) or inspect.isclass(fn):
        return False
    return inspect.iscoroutinefunction(inspect.getattr_static(type(fn), "__call__", None))

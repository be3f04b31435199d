"""Breaker state shared through Redis (pybreaker's ``CircuitRedisStorage``) with a local fallback.

Every manager that uses the same Redis and breaker name sees one breaker: failures from all of
them add up to the threshold, an open breaker rejects in all of them, and the reset timeout is
shared.  When Redis cannot be reached, the breaker keeps working on process-local state, the
condition is logged and reported, and the shared state is used again once Redis answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pybreaker
from loguru import logger

__all__ = ["FailoverStorage", "connect"]

# Delete the trial lease only if it still holds our token (it may have expired and been
# taken by another process meanwhile).
_RELEASE_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# pybreaker logs each Redis error with a traceback through the standard library; we report
# the condition ourselves, and a NullHandler keeps Python's last-resort handler from printing
# them when the application configured no logging.
logging.getLogger("pybreaker").addHandler(logging.NullHandler())

try:  # redis is the optional "redis" extra
    import redis
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - exercised only without the extra
    redis = None  # type: ignore[assignment]
    RedisError = OSError  # type: ignore[assignment,misc]


def connect(target: object, *, timeout: float = 0.5, parameter: str = "breaker_storage") -> Any:
    """A Redis client from a client object or a ``redis://`` URL, with short socket timeouts.

    ``parameter`` names the argument being converted in error messages.
    """
    if isinstance(target, str):
        if redis is None:
            raise ImportError(f"{parameter} needs redis: pip install 'dwcp[redis]'")
        if not target.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{parameter} URL must start with redis://, got {target!r}")
        try:
            return redis.Redis.from_url(
                target, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except ValueError as exc:
            raise ValueError(f"{parameter} URL is not a valid Redis URL: {exc}") from exc
    for method in ("get", "set", "incr", "setnx", "ping", "transaction", "eval"):
        if not callable(getattr(target, method, None)):
            raise TypeError(
                f"{parameter} must be a redis.Redis client or a redis:// URL, "
                f"got {type(target).__name__}"
            )
    return target


class _Guarded:
    """Forwards to the Redis client and reports every ``RedisError`` before re-raising it."""

    def __init__(self, client: Any, on_error: Callable[[BaseException], None]) -> None:
        self._client = client
        self._on_error = on_error

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except RedisError as exc:
                self._on_error(exc)
                raise

        return call


class FailoverStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage that uses Redis while it answers and local memory while it does not."""

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        trial_lease: float = 30.0,
    ) -> None:
        super().__init__("failover")
        self._client = client
        self._name = name
        self._retry_interval = retry_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._local = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._remote: pybreaker.CircuitRedisStorage | None = None
        self._degraded = False
        self._retry_at = 0.0
        self.errors = 0
        self.last_error: str | None = None
        #: How long a half-open trial holds the cross-process lease at most (seconds).
        self.trial_lease = trial_lease
        self._trial_token: str | None = None
        self._connect()

    # -- failover ------------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether the state currently lives in Redis."""
        self._target()
        return not self._degraded

    def _connect(self) -> None:
        try:
            self._remote = pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED,
                _Guarded(self._client, self._failed),  # type: ignore[arg-type]
                namespace=self._name,
            )
        except RedisError as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = self._clock() + self._retry_interval
            if self._degraded:
                return
            self._degraded = True
        logger.bind(error=self.last_error, breaker=self._name).warning(
            "Shared breaker state unreachable; using local state"
        )

    def _target(self) -> pybreaker.CircuitBreakerStorage:
        if self._degraded and self._clock() >= self._retry_at:
            self._try_restore()
        if self._degraded or self._remote is None:
            return self._local
        return self._remote

    def _try_restore(self) -> None:
        with self._lock:
            # One thread probes; the others keep using local state until it is done.
            if not self._degraded or self._clock() < self._retry_at:
                return
            self._retry_at = self._clock() + self._retry_interval
        try:
            self._client.ping()
        except RedisError as exc:
            self._failed(exc)
            return
        if self._remote is None:
            self._connect()
            if self._remote is None:
                return
        with self._lock:
            self._degraded = False
        logger.bind(breaker=self._name).info("Shared breaker state reachable again")

    # -- the half-open trial lease ----------------------------------------------------------

    def claim_trial(self) -> bool:
        """Take the one half-open trial across every process (``SET NX PX``), or say no.

        The lease expires after ``trial_lease`` seconds, so a holder that dies (or a trial
        that hangs) does not keep the breaker half-open and shut forever. With Redis
        unreachable each process decides alone, on its local state.
        """
        if self._target() is self._local:
            return True
        token = f"{id(self):x}-{time.monotonic_ns():x}"
        try:
            taken = self._client.set(
                self._key("trial"), token, nx=True, px=int(self.trial_lease * 1000)
            )
        except RedisError as exc:
            self._failed(exc)
            return True
        if taken:
            self._trial_token = token
        return bool(taken)

    def release_trial(self) -> None:
        """Give the lease back (only ours: compare and delete in one Redis step)."""
        token, self._trial_token = self._trial_token, None
        if token is None or self._degraded:
            return
        try:
            self._client.eval(_RELEASE_IF_OURS, 1, self._key("trial"), token)
        except RedisError as exc:
            self._failed(exc)

    # -- pybreaker's storage interface ---------------------------------------------------------
    # Each operation goes to Redis unless degraded; an operation that fails there is repeated
    # on the local state so that nothing the caller did is lost.

    # The local state is a copy of the last shared state this process knew (every write goes
    # to both, every state read from Redis is copied), so a failover goes on from it: an open
    # breaker stays open while Redis is down instead of starting over closed.

    def _do(self, op: Callable[[pybreaker.CircuitBreakerStorage], Any], write: bool = False) -> Any:
        target = self._target()
        result = op(target)
        if target is not self._local and (write or self._degraded):
            local = op(self._local)
            if self._degraded:
                result = local
        return result

    def _key(self, field: str) -> str:
        # CircuitRedisStorage's own key layout ("<namespace>:pybreaker:<field>"); a contract
        # test (tests/test_shared_breaker.py) fails if pybreaker changes it.
        return f"{self._name}:{pybreaker.CircuitRedisStorage.BASE_NAMESPACE}:{field}"

    @property
    def state(self) -> str:
        target = self._target()
        if target is self._local:
            return str(self._local.state)
        try:
            raw = self._client.get(self._key("state"))
        except RedisError as exc:
            self._failed(exc)
            return str(self._local.state)
        if raw is None:
            # Redis lost the state (restarted without persistence, say): pybreaker would
            # recreate it closed, closing an open breaker without a trial. Put ours back.
            self._restore_remote()
            return str(self._local.state)
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._local.state = value
        return value

    @state.setter
    def state(self, state: str) -> None:
        def put(storage: pybreaker.CircuitBreakerStorage) -> None:
            storage.state = state

        self._do(put, write=True)

    def _restore_remote(self) -> None:
        local, remote = self._local, self._remote
        assert remote is not None
        logger.bind(breaker=self._name, state=local.state).warning(
            f"Shared breaker state missing in Redis; restoring this process's ({local.state})"
        )
        try:
            self._client.set(self._key("fail_counter"), local.counter)
            self._client.set(self._key("success_counter"), local.success_counter)
            opened = local.opened_at
            if opened is not None:
                remote.opened_at = opened
            # Last, and only if still missing: another process may be restoring too.
            self._client.setnx(self._key("state"), local.state)
        except RedisError as exc:
            self._failed(exc)

    def increment_counter(self) -> None:
        self._do(lambda s: s.increment_counter(), write=True)

    def reset_counter(self) -> None:
        self._do(lambda s: s.reset_counter(), write=True)

    def increment_success_counter(self) -> None:
        self._do(lambda s: s.increment_success_counter(), write=True)

    def reset_success_counter(self) -> None:
        self._do(lambda s: s.reset_success_counter(), write=True)

    @property
    def counter(self) -> int:
        return int(self._do(lambda s: s.counter))

    @property
    def success_counter(self) -> int:
        return int(self._do(lambda s: s.success_counter))

    @property
    def opened_at(self) -> datetime | None:
        value: datetime | None = self._do(lambda s: s.opened_at)
        if value is not None and not self._degraded:
            self._local.opened_at = value
        return value

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        def put(storage: pybreaker.CircuitBreakerStorage) -> None:
            storage.opened_at = now

        self._do(put, write=True)

"""Breaker state shared through Redis (pybreaker's ``CircuitRedisStorage``) with a local fallback.

Every manager that uses the same Redis and breaker name sees one breaker: failures from all of
them add up to the threshold, an open breaker rejects in all of them, and the reset timeout is
shared.  Half-open admits one trial per open period in total: the claim is keyed by the period
(``claim_trial``) and outlives the trial.  When Redis cannot be reached, the breaker keeps
working on process-local state, the condition is logged and reported, and the shared state is
used again once Redis answers.  Meanwhile each process decides alone: each runs its own trial
every period, and the breaker stays open in each until its own trial succeeds.

The newer decision wins: every state change is stamped with when it was decided
(``<name>:pybreaker:decided_at_ms``), by every writer, the Lua scripts included.  A process that
decided while Redis was unreachable writes its state back when Redis answers only if it is
newer than what Redis holds (``_WRITE_BACK``), and otherwise adopts Redis's; a write older than
the stored decision is refused.  So a close decided alone during an outage is not undone by an
older open that another process wrote back first after an empty restart.

Beyond pybreaker's keys, ``opened_at`` is also kept in milliseconds (``<name>:pybreaker:
opened_at_ms``; pybreaker stores whole seconds), and every state change is published on the
channel ``<name>:pybreaker:changes`` so that other processes hear of it at once
(``FailoverStorage.on_remote_change``) instead of at their next poll.  ``<name>:pybreaker:
trial`` holds the claim on the current period's trial.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pybreaker
from loguru import logger

from dwcp import _validation as check
from dwcp._breaker import epoch_ms, from_epoch_ms

__all__ = ["FailoverStorage", "connect"]

# The half-open trial of one open period, across every process.  The trial key holds
# "<period> <deadline> <token>": the period is the shared opened_at in milliseconds, the
# deadline (epoch ms) when the trial counts as failed if no result has re-opened or closed
# the breaker.  The key is never deleted when a trial ends: a second claim for the same
# period must fail even after the first trial finished (its result moves the period on).
# One script serves both modes so the "the trial overran its deadline" step is the same:
#   claim  ARGV: 'claim', period, deadline, token, now, origin -> granted | taken | stale
#   expire ARGV: 'expire', period, '', '', now, origin          -> expired
# KEYS: state, opened_at (s), opened_at_ms, trial, changes, decided_at_ms.
# A re-open here is stamped (decided_at_ms, only ever moved later) as decided when the trial
# counted as failed (its deadline); a later open brought back, when it was opened (its period),
# not when it reached Redis: a close decided after either still wins the write-back.
_TRIAL = """
local state = redis.call('get', KEYS[1])
if not state or state == 'closed' then
  if ARGV[1] == 'expire' then return 'expired' end
  return 'stale'
end
local function decided(at)
  local held = redis.call('get', KEYS[6])
  if not held or tonumber(at) > tonumber(held) then redis.call('set', KEYS[6], at) end
end
local current = 0
local ms, s = redis.call('get', KEYS[3]), redis.call('get', KEYS[2])
if ms then current = tonumber(ms) end
if s and tonumber(s) * 1000 > current then current = tonumber(s) * 1000 end
local held = redis.call('get', KEYS[4])
local period, deadline = nil, nil
if held then
  period, deadline = string.match(held, '^(%d+) (%d+)')
end
if period and tonumber(period) == current and tonumber(deadline) <= tonumber(ARGV[5]) then
  -- The current period's trial ran past its deadline with no result: it failed, and the
  -- next period starts at its deadline.
  redis.call('set', KEYS[1], 'open')
  redis.call('set', KEYS[2], string.sub(deadline, 1, -4))
  redis.call('set', KEYS[3], deadline)
  decided(deadline)
  redis.call('publish', KEYS[5], ARGV[6] .. ' open')
  current = tonumber(deadline)
end
if ARGV[1] == 'expire' then return 'expired' end
if tonumber(ARGV[2]) > current then
  -- The caller opened later than Redis heard (its write was lost while Redis was away).
  -- While the current period's trial is still running, a later open is no new period: its
  -- trial would be a second one (after an empty restart each process brings its own open,
  -- a few milliseconds apart).  Otherwise its period becomes the shared one.
  if period and tonumber(period) == current then return 'taken' end
  redis.call('set', KEYS[2], string.sub(ARGV[2], 1, -4))
  redis.call('set', KEYS[3], ARGV[2])
  redis.call('set', KEYS[1], 'open')
  decided(ARGV[2])
  redis.call('publish', KEYS[5], ARGV[6] .. ' open')
  current = tonumber(ARGV[2])
end
if tonumber(ARGV[2]) ~= current then return 'stale' end
if period and tonumber(period) == current then return 'taken' end
redis.call('set', KEYS[4], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return 'granted'
"""

# Give an unused claim back (its call never reached the peer): only ours, in one step.
_RELEASE_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# opened_at in whole seconds (pybreaker's key, read by plain pybreaker processes) and in
# milliseconds (our companion key), each only if later than what is stored, in one step.
_SET_OPENED_AT = """
local function later(key, value)
  local current = redis.call('get', key)
  if not current or tonumber(value) > tonumber(current) then redis.call('set', key, value) end
end
later(KEYS[1], ARGV[1])
later(KEYS[2], ARGV[2])
return 1
"""

# Decision stamps (``decided_at_ms``) are the deciding process's wall clock in epoch ms, not
# Redis TIME: the decisions that must be ordered are the ones taken while Redis could not be
# reached (each process deciding alone), which Redis cannot stamp; and the breaker already
# relies on the processes' wall clocks agreeing (the shared ``opened_at`` is compared with
# each process's own clock for the reset timeout, trial deadlines are epoch ms).  Clocks that
# disagree by more than the time between two conflicting decisions can still order them
# wrongly; NTP keeps that to milliseconds.  A stamp that is missing (a plain pybreaker writer,
# or an older dwcp) counts as 0: older than any decision.

# A state decided now: written, stamped and announced in one step, unless Redis holds a
# newer decision (a process whose write was delayed past another's decision; refused, it
# adopts Redis's at its next read).  KEYS: state, decided_at_ms, changes.  ARGV: state,
# decided (ms), origin.  Returns 1 when written.
_SET_STATE = """
local held = redis.call('get', KEYS[2])
if held and tonumber(held) > tonumber(ARGV[2]) then return 0 end
redis.call('set', KEYS[1], ARGV[1])
redis.call('set', KEYS[2], ARGV[2])
redis.call('publish', KEYS[3], ARGV[3] .. ' ' .. ARGV[1])
return 1
"""

# A process that decided while Redis was unreachable, or that finds the state missing (Redis
# restarted empty), writes its local state back: only where Redis has none, or holds another
# state decided earlier than ours.  The same state is left as Redis has it (an open keeps the
# shared period, whose trial may be running), but its stamp is raised to ours if ours is
# later, so that a close decided between the two does not win over our newer open.
# KEYS: state, decided_at_ms, opened_at (s), opened_at_ms, fail_counter, success_counter,
# changes.  ARGV: state, decided (ms), opened_at (ms, or '' to leave it), fail count, success
# count, origin.  Returns {state, decided, 1 if ours was written}.
_WRITE_BACK = """
local state = redis.call('get', KEYS[1])
local held = tonumber(redis.call('get', KEYS[2]) or '0')
if state and state == ARGV[1] then
  -- The same state decided again, later (a trial that failed alone re-confirms an open):
  -- the stored stamp becomes ours, or an older other decision could still win over it.
  if tonumber(ARGV[2]) > held then
    redis.call('set', KEYS[2], ARGV[2])
    held = tonumber(ARGV[2])
  end
  return {state, tostring(held), 0}
end
if state and tonumber(ARGV[2]) <= held then
  return {state, tostring(held), 0}
end
redis.call('set', KEYS[1], ARGV[1])
redis.call('set', KEYS[2], ARGV[2])
redis.call('set', KEYS[5], ARGV[4])
redis.call('set', KEYS[6], ARGV[5])
if ARGV[3] ~= '' then
  local function later(key, value)
    local current = redis.call('get', key)
    if not current or tonumber(value) > tonumber(current) then redis.call('set', key, value) end
  end
  later(KEYS[3], string.sub(ARGV[3], 1, -4))
  later(KEYS[4], ARGV[3])
end
redis.call('publish', KEYS[7], ARGV[6] .. ' ' .. ARGV[1])
return {ARGV[1], ARGV[2], 1}
"""


def _now_ms() -> int:
    # The decision clock (see above); datetime.now like pybreaker's opened_at, so freezegun
    # moves both together in tests.
    return epoch_ms(datetime.now(timezone.utc))


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
        check.url_host(parameter, target)
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
        owns_client: bool = False,
    ) -> None:
        super().__init__("failover")
        self._client = client
        # Made from a URL by us: close() gives its idle connections back (a client passed
        # in is the caller's to close).
        self._owns_client = owns_client
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
        # Our claim on the current period's trial, as stored in Redis.
        self._trial_token: str | None = None
        # When the local state was decided (epoch ms, see _SET_STATE), and whether it holds a
        # decision Redis has not heard (taken while Redis was unreachable): written back, if
        # newer than Redis's, before this process reads Redis's state again.
        self._decided_ms = 0
        self._unshared = False
        # Tells our own change messages from other processes'.
        self._origin = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._callbacks: tuple[Callable[[], None], ...] = ()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._connect()

    # -- failover ------------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether the state currently lives in Redis (a plain read: reporting the mode never
        probes Redis; the next storage operation does)."""
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

    def _try_restore(self, *, now: bool = False) -> None:
        with self._lock:
            # One thread probes; the others keep using local state until it is done.
            if not self._degraded or (not now and self._clock() < self._retry_at):
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
        if self._unshared and not self._write_back():
            return
        with self._lock:
            self._degraded = False
        logger.bind(breaker=self._name).info("Shared breaker state reachable again")

    # -- the half-open trial of each open period ----------------------------------------------

    def claim_trial(self, period: int, deadline: int) -> str:
        """Take the one half-open trial of the open period ``period`` across every process.

        ``period`` is the shared ``opened_at`` this process timed out from, in epoch
        milliseconds; ``deadline`` (epoch ms) is when the trial counts as failed if its result
        has not moved the breaker on by then, so a holder that dies or hangs gives the breaker
        its next period instead of keeping it half-open for good.  Returns ``granted``;
        ``taken`` when this period's trial was already claimed (running or finished: the
        claim outlives the trial); ``stale`` when Redis says the breaker has moved on (closed,
        or another period) and this process should re-read the state; or ``local`` when Redis
        is unreachable, so that this process decides alone on its own state.
        """
        if self._degraded:
            # Deciding alone is what admits a trial per process: before it, ask Redis now,
            # not at the next retry (a blip or a quick restart would otherwise leave every
            # process deciding alone for up to retry_interval after Redis answers again).
            self._try_restore(now=True)
        if self._target() is self._local:
            return "local"
        token = secrets.token_hex(8)
        try:
            answer = self._trial_script("claim", str(period), str(deadline), token)
        except RedisError as exc:
            self._failed(exc)
            return "local"
        if answer == "granted":
            self._trial_token = f"{period} {deadline} {token}"
        return answer

    def end_trial(self) -> None:
        """The trial's result is recorded: forget the claim, which stays in Redis so that
        the period it belongs to gets no second trial."""
        self._trial_token = None

    def release_trial(self) -> None:
        """Give back a claim whose call never reached the peer, so another process may run
        this period's trial (only our own claim: compare and delete in one Redis step)."""
        token, self._trial_token = self._trial_token, None
        if token is None or self._degraded:
            return
        try:
            self._client.eval(_RELEASE_IF_OURS, 1, self._key("trial"), token)
        except RedisError as exc:
            self._failed(exc)

    def expire_trial(self, period: int, deadline: int) -> None:
        """The trial of ``period`` ran past ``deadline``: open the breaker from the deadline,
        unless a result or another process has already moved it on."""
        self._trial_token = None
        if self._target() is not self._local:
            try:
                self._trial_script("expire", str(period), "", "")
                return
            except RedisError as exc:
                self._failed(exc)
        local = self._local
        if str(local.state) != pybreaker.STATE_CLOSED:
            moment = from_epoch_ms(deadline)
            if local.opened_at is None or moment > local.opened_at:
                local.opened_at = moment
            local.state = pybreaker.STATE_OPEN
            # Decided alone, as failed at the deadline (as the script stamps it).
            self._decided_ms = max(self._decided_ms, deadline)
            self._unshared = True

    def _trial_script(self, mode: str, period: str, deadline: str, token: str) -> str:
        now = str(epoch_ms(datetime.now(timezone.utc)))
        fields = ("state", "opened_at", "opened_at_ms", "trial", "changes", "decided_at_ms")
        keys = [self._key(f) for f in fields]
        raw = self._client.eval(_TRIAL, 6, *keys, mode, period, deadline, token, now, self._origin)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

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
        # test (tests/ops/test_shared_breaker.py) fails if pybreaker changes it.
        return f"{self._name}:{pybreaker.CircuitRedisStorage.BASE_NAMESPACE}:{field}"

    @property
    def state(self) -> str:
        target = self._target()
        if target is self._local:
            return str(self._local.state)
        try:
            raw, decided = self._client.mget(self._key("state"), self._key("decided_at_ms"))
        except RedisError as exc:
            self._failed(exc)
            return str(self._local.state)
        if raw is None or self._unshared:
            # Redis lost the state (restarted without persistence, say): pybreaker would
            # recreate it closed, closing an open breaker without a trial. Put ours back,
            # unless another process put back a newer one first.  (Or a decision of ours
            # taken alone is still to be written back: never adopt an older one over it.)
            if raw is None:
                logger.bind(breaker=self._name, state=self._local.state).warning(
                    "Shared breaker state missing in Redis; restoring this process's "
                    f"({self._local.state}) unless another process restored a newer one"
                )
            self._write_back()
            return str(self._local.state)
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._local.state = value
        self._decided_ms = int(decided or 0)
        return value

    @state.setter
    def state(self, state: str) -> None:
        decided = _now_ms()
        shared = False
        if self._target() is not self._local:
            # The write, its stamp and its announcement in one round trip.
            keys = [self._key(f) for f in ("state", "decided_at_ms", "changes")]
            try:
                self._client.eval(_SET_STATE, 3, *keys, str(state), decided, self._origin)
                shared = True  # written, or refused as older than Redis's: Redis decides
            except RedisError as exc:
                self._failed(exc)
        self._local.state = state
        self._decided_ms = decided
        self._unshared = not shared

    def _write_back(self) -> bool:
        """Write the local state to Redis where Redis has none or an older decision of another
        state (``_WRITE_BACK``), and adopt whichever Redis then holds; False if Redis failed."""
        local = self._local
        state = str(local.state)
        opened = ""
        if state != pybreaker.STATE_CLOSED:
            # An open this process decided alone (its own trial failed while Redis was down)
            # keeps its period: that period never reached Redis, so no other process can have
            # claimed its trial, and a half-open process adopting a period that has already
            # timed out stays half-open instead of re-opening.  An open read from Redis before
            # it lost it starts a new period now: whether that period's trial already ran (its
            # claim went with Redis) is unknown, and no period may get a second trial.
            period = local.opened_at if self._unshared else None
            opened = str(epoch_ms(period) if period is not None else _now_ms())
        fields = ("state", "decided_at_ms", "opened_at", "opened_at_ms", "fail_counter")
        keys = [self._key(f) for f in (*fields, "success_counter", "changes")]
        args = (state, self._decided_ms, opened, local.counter, local.success_counter)
        try:
            held, decided, written = self._client.eval(_WRITE_BACK, 7, *keys, *args, self._origin)
        except RedisError as exc:
            self._failed(exc)
            return False
        value = held.decode() if isinstance(held, bytes) else str(held)
        if int(written):
            if opened:
                local.opened_at = from_epoch_ms(int(opened))
        else:
            logger.bind(breaker=self._name, local=state, shared=value).debug(
                "Shared breaker holds a newer decision than this process's; adopting it"
            )
        local.state = value
        self._decided_ms = int(decided)
        self._unshared = False
        return True

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
        if self._target() is self._local:
            return self._local.opened_at
        try:
            ms, seconds = self._client.mget(self._key("opened_at_ms"), self._key("opened_at"))
        except RedisError as exc:
            self._failed(exc)
            return self._local.opened_at
        # The later of the two: a plain pybreaker process writes only the seconds.
        stamps = [int(ms)] if ms is not None else []
        if seconds is not None:
            stamps.append(int(seconds) * 1000)
        if not stamps:
            return None
        value = from_epoch_ms(max(stamps))
        self._local.opened_at = value
        return value

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        if self._target() is not self._local:
            self._write_opened_at(now)
        self._local.opened_at = now

    def _write_opened_at(self, moment: datetime) -> None:
        if moment.tzinfo is None:  # pybreaker passes aware UTC; a naive one is taken as UTC
            moment = moment.replace(tzinfo=timezone.utc)
        ms = epoch_ms(moment)
        keys = (self._key("opened_at"), self._key("opened_at_ms"))
        try:
            self._client.eval(_SET_OPENED_AT, 2, *keys, ms // 1000, ms)
        except RedisError as exc:
            self._failed(exc)

    # -- hearing of other processes' changes ------------------------------------------------

    def on_remote_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` soon after another process changes the shared state.

        A thread named ``dwcp-breaker-watch`` subscribes to the breaker's change channel; it
        also calls back after each (re)subscription, since changes made while it was
        disconnected were not heard.  Callbacks run on that thread and must be quick (read
        the state, never block).  Registering one callback twice is a no-op; ``close()``
        stops the thread and a later registration starts it again.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        with self._lock:
            if callback not in self._callbacks:
                self._callbacks = (*self._callbacks, callback)
            if self._watcher is not None:
                return
            self._watch_stop = threading.Event()
            self._watcher = threading.Thread(
                target=self._watch,
                args=(self._watch_stop,),
                name="dwcp-breaker-watch",
                daemon=True,
            )
            self._watcher.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop and join the change subscriber, if one runs, and close the idle connections
        of a client made from a URL (the next use opens one again); idempotent."""
        with self._lock:
            watcher, self._watcher = self._watcher, None
            self._watch_stop.set()
        if watcher is not None:
            watcher.join(timeout)
            if watcher.is_alive():
                logger.bind(breaker=self._name).warning("Breaker change subscriber did not stop")
        pool = getattr(self._client, "connection_pool", None) if self._owns_client else None
        if pool is not None:
            # Only the idle ones: a call still running on another thread keeps its connection
            # (closing it under the call would fail it with a bare AttributeError), and
            # gives it back to the pool. The next use connects again.
            pool.disconnect(inuse_connections=False)

    def _notify(self) -> None:
        for callback in self._callbacks:
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - the subscriber outlives a bad callback
                logger.opt(exception=exc).bind(breaker=self._name).error(
                    "Breaker change callback raised"
                )

    def _watch(self, stop: threading.Event) -> None:
        channel = self._key("changes")
        own = self._origin
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                self._notify()  # whatever changed while we were not subscribed
                while not stop.is_set():
                    # Short waits, so close() is answered within one of them.
                    message = pubsub.get_message(timeout=0.1)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if text.split(" ", 1)[0] != own:
                        self._notify()
            except (RedisError, OSError) as exc:
                logger.bind(breaker=self._name, error=f"{type(exc).__name__}: {exc}").debug(
                    "Breaker change subscriber lost Redis; retrying"
                )
                stop.wait(self._retry_interval)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (RedisError, OSError):
                        pass

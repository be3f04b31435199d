"""The receiver's sessions and its decisions about them, with no I/O and no clock.

``SessionTable`` holds the open sessions, the ids of ended ones and where each named sender's
delivery stands, and decides what a HELLO gets (accepted, busy, refused: see
docs/wire-format.md, WELCOME), when a half-joined or replaced session is over, and what it
forgets. The receiver calls it under its lock, passing the time; it writes the WELCOMEs,
closes connections and runs the threads (``receiver.py``).
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, NamedTuple

from dwcp.transport import wire
from dwcp.transport._reassembly import Reassembly

if TYPE_CHECKING:
    from dwcp.transport._reader import Connection

__all__ = ["SENDERS_KEPT", "Admission", "Sender", "Session", "SessionTable"]

# Ids of ended sessions remembered to refuse a late stream joining a dead session.
ENDED_SESSIONS_KEPT = 1024
# Senders (by sender id) whose next message id is remembered, to drop what a reconnected
# sender resends and was delivered already; least recently seen forgotten first.
SENDERS_KEPT = 4096
# An unacknowledged session replaced by a newer one of its sender is read until its streams
# end, or until it made no progress (no message completed or delivered) for this long: its
# link may be dead, and the newer session delivers nothing before it is over.
REPLACED_GRACE = 1.0


class Sender:
    """What the receiver remembers of one named sender across its sessions: where its
    delivery stands (acknowledged senders resend from there), and its newest session."""

    __slots__ = ("first_id", "next_id", "session")

    def __init__(self) -> None:
        # The id after the last one delivered (None: nothing yet). Only the delivery thread
        # of the sender's current session uses it, once its predecessor finished.
        self.next_id: int | None = None
        self.session: Session | None = None  # the newest session
        # The first id of the newest session accepted. A sender's
        # first ids never go down, so a HELLO below it is a late one of a session attempt
        # the sender gave up on (a stalled link delivered it after the newer session's).
        self.first_id: int | None = None


class Session:
    """The receiving state of one sender session (all its streams)."""

    def __init__(
        self,
        hello: wire.Handshake,
        max_buffered: int,
        created: float,
        sender: Sender | None = None,
        predecessor: Session | None = None,
    ) -> None:
        self.id = hello.session_id
        self.name = hello.session_id.hex()
        self.stream_count = hello.stream_count
        self.acknowledged = hello.acknowledged
        # The sender pings this often; a reader waiting for room says "alive" as often.
        self.heartbeat = hello.keepalive_ms / 1000 if hello.keepalive_ms else None
        self.created = created
        self.first_id = hello.first_id
        self.sender_id = hello.sender_id
        self.reassembly = Reassembly(
            hello.stream_count, max_buffered=max_buffered, first_id=hello.first_id
        )
        # A named sender's memory of what was delivered, and the session it had before this
        # one, which must finish delivering first (so its sessions never overlap).
        self.sender = sender
        self.predecessor = predecessor
        self.over = threading.Event()  # set once nothing more will be delivered
        # The highest message id a DATA frame asked to be acknowledged at once (ACK_NOW);
        # written by the readers, read by the delivery thread.
        self.ack_now = -1
        # The table's (guarded by the receiver's lock).
        self.connections: list[Connection | None] = [None] * hello.stream_count
        self.joined = 0
        self.streams_ended = 0  # joined streams that ended cleanly
        # Since when a session replaced by a newer one of its sender made no progress (0.0:
        # not replaced), and its progress then.
        self.superseded_at = 0.0
        self.superseded_progress = 0
        self.delivery: threading.Thread | None = None
        self.aborted = False
        self.finished = False


class Admission(NamedTuple):
    """What a HELLO gets: its WELCOME status, why when not accepted, the session it joined,
    and the older session of the same sender it replaced.

    A sender runs one session at a time: a new one means it gave up the old one (a failure
    it saw first, or its ``close()``). What the old one holds whole and in order is still
    delivered, before anything of the new one. ``close_replaced``: an acknowledged old
    session is closed at once (its sender resends what it did not get to). An unacknowledged
    one is not (nothing would be resent, and the new HELLO can overtake, on its own
    connection, what the sender wrote on the old ones before closing them): its streams are
    read to their end, and ``SessionTable.expired`` ends it if it stops making progress.
    """

    status: int
    reason: str | None = None
    session: Session | None = None
    replaced: Session | None = None

    @property
    def close_replaced(self) -> bool:
        """Whether the replaced session is to be closed now (see the class doc)."""
        return self.replaced is not None and self.replaced.acknowledged


class SessionTable:
    """The receiver's sessions (see the module doc); every method expects the caller to
    hold the receiver's lock, and none blocks."""

    def __init__(self, *, max_sessions: int, max_buffered: int, join_timeout: float) -> None:
        self.max_sessions = max_sessions
        self.max_buffered = max_buffered
        self.join_timeout = join_timeout
        #: Open sessions by id: each counts toward ``max_sessions`` until ``finish``.
        self.sessions: dict[bytes, Session] = {}
        self.ended: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # Kept across the receiver's stop()/start(): exactly once holds while it lives.
        self.senders: collections.OrderedDict[bytes, Sender] = collections.OrderedDict()

    def admit(self, hello: wire.Handshake, conn: Connection, now: float) -> Admission:
        """Decide what ``hello`` (read on ``conn`` at ``now``) gets; when accepted, ``conn``
        is the session's stream ``hello.stream_index``.

        Refusals come before busy: a HELLO refused for what it says would be refused again
        later, while a busy one may be accepted then. Joining an open session is never busy.
        """
        session = self.sessions.get(hello.session_id)
        replaced = None
        if hello.session_id in self.ended:
            return Admission(wire.STATUS_REFUSED, "session already ended")
        if session is None:
            named = hello.sender_id != wire.ANONYMOUS_SENDER
            known = self.senders.get(hello.sender_id) if named else None
            if known is not None and known.first_id is not None and hello.first_id < known.first_id:
                # Not newer than the sender's current session: replacing that one with an
                # abandoned attempt would lose what the sender sends now.
                return Admission(wire.STATUS_REFUSED, "older than its sender's newest session")
            if len(self.sessions) >= self.max_sessions:
                return Admission(wire.STATUS_BUSY, "too many sessions")
            sender = self.sender(hello.sender_id) if named else None
            predecessor = sender.session if sender is not None else None
            session = Session(hello, self.max_buffered, now, sender, predecessor)
            self.sessions[hello.session_id] = session
            if sender is not None:
                sender.session = session
                sender.first_id = hello.first_id
                if predecessor is not None and not predecessor.finished:
                    replaced = predecessor
                    predecessor.superseded_at = now
                    predecessor.superseded_progress = predecessor.reassembly.progress
        elif (session.stream_count, session.acknowledged, session.sender_id, session.first_id) != (
            hello.stream_count,
            hello.acknowledged,
            hello.sender_id,
            hello.first_id,
        ):
            return Admission(wire.STATUS_REFUSED, "handshake disagrees with its session")
        elif session.aborted:
            return Admission(wire.STATUS_REFUSED, "session is closing")
        elif session.connections[hello.stream_index] is not None:
            return Admission(wire.STATUS_REFUSED, f"stream {hello.stream_index} already connected")
        session.connections[hello.stream_index] = conn
        session.joined += 1
        return Admission(wire.STATUS_ACCEPTED, None, session, replaced)

    def sender(self, sender_id: bytes) -> Sender:
        """The remembered state of ``sender_id`` (new if unknown).

        At most ``SENDERS_KEPT`` are kept: the least recently seen without an open session
        is forgotten first (its next session then counts as a new sender: at least once).
        """
        senders = self.senders
        sender = senders.get(sender_id)
        if sender is None:
            sender = senders[sender_id] = Sender()
            if len(senders) > SENDERS_KEPT:
                for old_id, old in senders.items():
                    if old.session is None or old.session.finished:
                        del senders[old_id]
                        break
        else:
            senders.move_to_end(sender_id)
        return sender

    def stream_ended(self, session: Session) -> bool:
        """One of ``session``'s streams ended cleanly. True when that makes it abandoned: a
        session some of whose announced streams never joined is over as soon as every stream
        that did join has ended (its sender gave up on it: it ends a session only after every
        stream was welcomed), so it does not hold a slot until ``join_timeout``. It is then
        marked aborted (a late stream is refused as closing); the caller closes it."""
        session.streams_ended += 1
        abandoned = (
            session.streams_ended == session.joined < session.stream_count and not session.aborted
        )
        if abandoned:
            session.aborted = True
        return abandoned

    def expired(self, now: float) -> list[Session]:
        """The sessions to close at ``now``, marked aborted: those whose announced streams did
        not all join within ``join_timeout``, and replaced (unacknowledged) ones that made no
        progress for ``REPLACED_GRACE``. Marked here, under the lock the check was made
        under: a stream arriving before the caller closes them is refused as closing."""
        late = [
            s
            for s in self.sessions.values()
            if not s.aborted
            and (
                (s.joined < s.stream_count and now - s.created > self.join_timeout)
                or (s.superseded_at and self._replaced_and_stalled(s, now))
            )
        ]
        for session in late:
            session.aborted = True
        return late

    @staticmethod
    def _replaced_and_stalled(session: Session, now: float) -> bool:
        progress = session.reassembly.progress  # only compared: no lock of its own needed
        if progress != session.superseded_progress:
            session.superseded_at, session.superseded_progress = now, progress
            return False
        return now - session.superseded_at > REPLACED_GRACE

    def finish(self, session: Session) -> bool:
        """Forget ``session``: nothing more will be delivered for it. False if it was
        already; its id is remembered among the last ``ENDED_SESSIONS_KEPT`` ended."""
        if session.finished:
            return False
        session.finished = True
        session.over.set()
        if session.sender is not None and session.sender.session is session:
            session.sender.session = None
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        self.ended[session.id] = None
        while len(self.ended) > ENDED_SESSIONS_KEPT:
            self.ended.popitem(last=False)
        return True

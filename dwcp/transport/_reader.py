"""The receiver's I/O per stream: a connection, and the reader that turns its bytes into frames.

No protocol decision is made here: ``StreamParser`` (``_receiving``) parses, ``Reassembly``
admits and orders; this reads from the kernel (or TLS), bounds each read in time, waits for
buffer room, and answers PINGs with the PONGs the parser asks for.
"""

from __future__ import annotations

try:  # POSIX: how many bytes a socket holds, to tell whether a read would block
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows
    pass
import math
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

from dwcp.transport import wire
from dwcp.transport._io import TLSChannel, set_kernel_timeout
from dwcp.transport._progress import peer_finished
from dwcp.transport._reassembly import FrameTuple
from dwcp.transport._receiving import StreamParser, alive_due, read_tick, stall_due

if TYPE_CHECKING:
    from dwcp.transport._sessions import Session

__all__ = ["Connection", "StreamReader", "bytes_waiting"]

# Small frames are parsed out of one buffer of this size, many per recv().
_READ_BUFFER = 256 * 1024
# A large payload is read in pieces of at most this size: a header alone never makes the
# receiver allocate more than this before the bytes are there.
_PIECE = 1 << 20
_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_HEADER = wire.DATA_HEADER.size
_STALLED = "no byte of a begun frame arrived within frame_timeout ({:g} s)"
_ALIVE = wire.pack_pong(0)  # an unprompted PONG: "alive", answering every PING before it


class Connection:
    """One accepted socket and the thread that reads it."""

    __slots__ = (
        "deaf",
        "holders",
        "index",
        "peer",
        "recv_timeout",
        "said",
        "session",
        "sock",
        "thread",
        "tls",
        "write_lock",
    )

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.write_lock = threading.Lock()
        self.tls: TLSChannel | None = None
        self.session: Session | None = None
        self.index = -1
        self.thread: threading.Thread | None = None
        self.recv_timeout: float | None = None
        self.holders = 1  # the reader; see MultiStreamReceiver._release
        self.deaf = False  # a PONG could not be written: the sender has closed (see answer)
        self.said = -math.inf  # when the last PONG went out (none yet: the first is due at once)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.sendall(data)
            return
        with self.write_lock:
            self.sock.sendall(data)

    def answer(self, pong: bytes) -> None:
        """Write a PONG, unless the sender has finished: a sender that wrote everything and
        closed answers any write with a reset, and a reset discards what we have not read
        yet (a backpressured session's last messages, all sent, flushed and closed on). So
        no PONG once its FIN has arrived (it waits for none then), and a PONG that fails
        ends the PONGs, not the reading, which ends at the FIN or at a failed read."""
        if self.deaf or peer_finished(self.sock):
            self.deaf = True
            return
        self.said = time.monotonic()
        try:
            self.write(pong)
        except OSError:
            self.deaf = True

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def close(self) -> None:
        """Close the socket, never while another thread (delivery's ACKs) is writing to it:
        the kernel could hand the number to a new socket in the middle of that write."""
        with self.tls.write_lock if self.tls is not None else self.write_lock:
            self.sock.close()

    def set_recv_timeout(self, seconds: float | None) -> None:
        """Set the kernel receive timeout (None: none), skipping the syscall when it would
        change by less than 5 %."""
        current = self.recv_timeout
        if seconds == current:
            return
        if seconds is not None and current is not None and abs(current - seconds) <= 0.05 * seconds:
            return
        set_kernel_timeout(self.sock, socket.SO_RCVTIMEO, seconds)
        self.recv_timeout = seconds


class StreamReader:
    """Reads the streams of a receiver's sessions (one thread per stream calls it)."""

    def __init__(
        self, *, max_message_size: int, idle_timeout: float | None, frame_timeout: float
    ) -> None:
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout

    def read_exactly(self, conn: Connection, size: int, deadline: float, what: str) -> bytes:
        """Read ``size`` bytes before ``deadline``; ProtocolError on EOF or when it passes."""
        buf = bytearray(size)
        view = memoryview(buf)
        recv_into = conn.tls.recv_into if conn.tls is not None else conn.sock.recv_into
        got = 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise wire.ProtocolError(f"{what} not complete within its deadline")
            conn.set_recv_timeout(left)
            try:
                part = recv_into(view[got:])
            except (BlockingIOError, TimeoutError):
                raise wire.ProtocolError(f"{what} not complete within its deadline") from None
            if not part:
                raise wire.ProtocolError(f"connection closed during {what}")
            got += part
        return bytes(buf)

    def read_frames(self, conn: Connection, session: Session) -> None:
        """Read a stream; its parser turns the bytes into frames, handed over in batches.

        Payloads of ``LARGE`` bytes or more are read straight into their own bytes objects
        (after their budget is reserved), and the header after one is read alone, so large
        messages are copied once from the kernel and never through the buffer.
        """
        sock, tls = conn.sock, conn.tls
        recv_into = tls.recv_into if tls is not None else sock.recv_into
        buf = bytearray(_READ_BUFFER)
        view = memoryview(buf)
        size = len(buf)
        start = end = 0
        reassembly = session.reassembly
        parser = StreamParser(self.max_message_size)
        parse, pings = parser.parse, parser.pings
        monotonic = time.monotonic
        idle, frame_timeout = self.idle_timeout, self.frame_timeout
        heartbeat = session.heartbeat
        batch: list[FrameTuple] = []
        header_size = _HEADER
        exact = False  # read the next header alone: a large frame may follow
        # When a byte last arrived (or a wait of ours for buffer room ended): a frame begun
        # fails on a stall of frame_timeout, however long it takes while bytes keep coming.
        moved = monotonic()
        # One kernel timeout for the whole session, a fraction of the shortest bound; the
        # bounds themselves are kept here, so no recv() needs a setsockopt() first.
        tick = read_tick(frame_timeout, idle, heartbeat)
        silent = 0  # ticks without a byte
        conn.set_recv_timeout(tick)
        while True:
            try:
                parsed = parse(buf, start, end, batch)
            except wire.ProtocolError:
                # What came whole before the bad frame is still delivered (wire-format.md).
                if batch:
                    self.push(conn, session, batch)
                raise
            start = parsed
            # (A lost race between streams only delays the ACK, see delivery.)
            session.ack_now = max(session.ack_now, parser.ack_now)
            asked = False
            if pings:
                for token in pings:
                    conn.answer(wire.pack_pong(token))
                pings.clear()
                if session.acknowledged:
                    # A PING asks for the ACK of what its stream carried before it (the
                    # sender's flush()): as if that DATA had been flagged ACK_NOW.
                    read = batch[-1][0] if batch else reassembly.last_id(conn.index)
                    session.ack_now = max(session.ack_now, read)
                    asked = True
            if batch:
                self.push(conn, session, batch)
                batch.clear()
                moved = monotonic()  # a wait for buffer room was ours, not the peer's stall
            if asked:
                reassembly.nudge()
            large = parser.large
            if large is not None:
                self.read_large(
                    conn, session, large.frame, view[start:end], large.checked, large.checksum,
                    moved,
                )  # fmt: skip
                start = end = 0
                exact = True
            elif end - start >= header_size:
                exact = False  # a small frame's payload is still to come: read in bulk
            if start == end:
                start = end = 0
            else:
                if start:
                    left = end - start
                    # From a memoryview the move is one memcpy, safe only without overlap.
                    buf[:left] = view[start:end] if left <= start else buf[start:end]
                    start, end = 0, left
                if monotonic() - moved >= frame_timeout:
                    raise wire.ProtocolError(_STALLED.format(frame_timeout))
            want = header_size - end if exact and end < header_size else size - end
            try:
                if tls is None:
                    try:
                        got = recv_into(view[end : end + want], 0, _MSG_DONTWAIT)
                    except BlockingIOError:
                        # Nothing to read right now: let delivery have what is ready first.
                        reassembly.announce()
                        got = recv_into(view[end : end + want])
                else:  # TLS cannot tell whether a read would block: announce every time
                    reassembly.announce()
                    got = recv_into(view[end : end + want])
            except (BlockingIOError, TimeoutError):  # one tick of silence
                silent += 1
                if idle is not None and silent * tick >= idle:
                    raise TimeoutError("idle timeout") from None
                continue
            if not got:
                if end:
                    raise wire.ProtocolError("connection closed inside a frame")
                return  # clean end of stream, between frames
            silent = 0
            moved = monotonic()
            end += got
            if alive_due(moved, conn.said, heartbeat):
                conn.answer(_ALIVE)

    def push(self, conn: Connection, session: Session, batch: list[FrameTuple]) -> None:
        """Hand a batch to reassembly, waiting (and saying "alive") while it has no room."""
        reassembly = session.reassembly
        taken = reassembly.push(conn.index, batch)
        while taken < len(batch):
            self.wait_for_room(conn, session, batch[taken])
            taken += reassembly.push(conn.index, batch[taken:])

    def wait_for_room(self, conn: Connection, session: Session, frame: FrameTuple) -> None:
        """Backpressure: block while the session's budget is full.

        While waiting, answer the sender's keepalive unprompted (its PINGs queue unread
        behind this frame). Without any progress for ``idle_timeout`` the session is stuck
        on its peer (a hostile one holding budget with messages it never completes): close.
        """
        reassembly = session.reassembly
        step = session.heartbeat or self.idle_timeout
        progress, since = reassembly.progress, time.monotonic()
        if stall_due(since, conn.said, session.heartbeat):
            conn.answer(_ALIVE)  # at once: a sender closing now waits for the consumer
        while not reassembly.wait_for_room(frame, step):
            if reassembly.progress != progress:
                progress, since = reassembly.progress, time.monotonic()
            elif self.idle_timeout is not None and (time.monotonic() - since >= self.idle_timeout):
                raise wire.ProtocolError("reassembly made no progress within idle_timeout")
            if session.heartbeat:
                conn.answer(wire.pack_pong(0))

    def read_large(
        self,
        conn: Connection,
        session: Session,
        frame: FrameTuple,
        head: memoryview,
        checked: bool,
        checksum: int,
        moved: float,
    ) -> None:
        """Reserve budget for a large frame, then read its payload in bounded pieces.

        ``moved``: when a byte of the stream last arrived; the frame fails once none came
        for ``frame_timeout`` (a stall), not at a deadline for the whole frame.
        """
        reassembly = session.reassembly
        if not reassembly.reserve(conn.index, frame):
            self.wait_for_room(conn, session, frame)
            while not reassembly.reserve(conn.index, frame):
                self.wait_for_room(conn, session, frame)
            moved = time.monotonic()  # waiting was ours, not theirs
        crc = wire.checksum_of
        pieces: list[bytes | bytearray] = []
        value = 0
        if len(head):
            first = bytes(head)
            pieces.append(first)
            value = crc(first)
        mid, index, _, _, _, length = frame
        left = length - len(head)
        heartbeat = session.heartbeat
        while left:
            piece = self.recv_piece(conn, session, min(left, _PIECE), moved)
            moved = time.monotonic()
            if alive_due(moved, conn.said, heartbeat):
                conn.answer(_ALIVE)
            # Each piece's CRC right after it arrived, while it is in the cache; the readers
            # of a session's streams do this in parallel (the GIL is released for it).
            if checked:
                value = crc(piece, value)
            pieces.append(piece)
            left -= len(piece)
        if checked and value != checksum:
            raise wire.ProtocolError(f"checksum mismatch in message {mid} chunk {index}")
        reassembly.store((mid, index, frame[2], frame[3], pieces, length))

    def recv_piece(
        self, conn: Connection, session: Session, size: int, moved: float
    ) -> bytes | bytearray:
        """Read ``size`` bytes into a new object, straight from the kernel where possible;
        ProtocolError once no byte came for ``frame_timeout`` (``moved``: the last one)."""
        stall = self.frame_timeout
        if conn.tls is None:
            # About to block: what is ready must not wait for this read (see announce()).
            if bytes_waiting(conn.sock) < size:
                session.reassembly.announce()
            piece = b""
            while True:
                try:
                    part = conn.sock.recv(size - len(piece), _MSG_WAITALL)
                except (BlockingIOError, TimeoutError):  # a tick of silence
                    part = None
                if part is not None:
                    if not part:
                        raise wire.ProtocolError("connection closed inside a frame")
                    # Whole at once is the rule; a piece cut by a tick of silence is joined.
                    piece = part if not piece else piece + part
                    if len(piece) == size:
                        return piece
                    # (A tick's read returns what came during the tick, so the byte may be
                    # up to a tick older than this: a stall is seen up to a tick late.)
                    moved = time.monotonic()
                    if alive_due(moved, conn.said, session.heartbeat):
                        conn.answer(_ALIVE)
                elif time.monotonic() - moved >= stall:
                    raise wire.ProtocolError(_STALLED.format(stall))
        session.reassembly.announce()  # TLS cannot tell whether the read would block
        buf = bytearray(size)
        with memoryview(buf) as view:
            got = 0
            while got < size:
                try:
                    part_size = conn.tls.recv_into(view[got:])
                except (BlockingIOError, TimeoutError):
                    part_size = -1
                if part_size == 0:
                    raise wire.ProtocolError("connection closed inside a frame")
                if part_size > 0:
                    got += part_size
                    moved = time.monotonic()
                    if alive_due(moved, conn.said, session.heartbeat):
                        conn.answer(_ALIVE)
                elif time.monotonic() - moved >= stall:
                    raise wire.ProtocolError(_STALLED.format(stall))
        return buf


def bytes_waiting(sock: socket.socket) -> int:
    """How many bytes the kernel holds for ``sock`` now (0 where it cannot say)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    except (OSError, NameError):
        return 0

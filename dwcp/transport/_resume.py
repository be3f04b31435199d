"""The receiver's opt-in ids and resume positions (``with_ids``, ``resume_from``): what an
application needs for exactly-once processing across a receiver process restart.

The sender's id names a ``MultiStreamTCPTransport`` object for its life; its message ids
count from 0 across its sessions, and a reconnected sender resends what was not confirmed
under the same ids. A receiver that knows where the application stands per sender drops
the resent messages at or below it, as it drops duplicates within one process.
"""

from __future__ import annotations

from collections.abc import Mapping

from dwcp.transport import wire

__all__ = ["resume_positions"]

_LAST_ID = (1 << 64) - 1  # message ids are u64 on the wire


def resume_positions(resume_from: object, limit: int) -> dict[bytes, int]:
    """``{sender id: next message id to deliver}`` from ``{sender_id hex: last processed id}``,
    or a ``TypeError``/``ValueError`` naming ``resume_from``."""
    if resume_from is None:
        return {}
    if not isinstance(resume_from, Mapping):
        raise TypeError(
            f"resume_from must be a mapping of sender id to message id, "
            f"got {type(resume_from).__name__}"
        )
    if len(resume_from) > limit:
        raise ValueError(f"resume_from names {len(resume_from)} senders, more than {limit}")
    positions: dict[bytes, int] = {}
    for key, last in resume_from.items():
        if not isinstance(key, str):
            raise TypeError(f"resume_from keys must be sender ids (str), got {key!r}")
        try:
            sender = bytes.fromhex(key)
        except ValueError:
            sender = b""
        if len(sender) != wire.SENDER_ID_SIZE or sender == wire.ANONYMOUS_SENDER:
            raise ValueError(
                f"resume_from key {key!r} is not a sender id "
                f"({2 * wire.SENDER_ID_SIZE} hex digits, not all zero)"
            )
        if isinstance(last, bool) or not isinstance(last, int):
            raise TypeError(f"resume_from[{key!r}] must be an int, got {type(last).__name__}")
        if not 0 <= last <= _LAST_ID:
            raise ValueError(
                f"resume_from[{key!r}] must be a message id (>= 0, below 2**64: ids are "
                f"64-bit on the wire), got {last}"
            )
        positions[sender] = last + 1
    return positions

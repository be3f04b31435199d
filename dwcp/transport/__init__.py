"""Multi-stream TCP transport: a sender striping messages over TCP connections, and its receiver."""

from dwcp.transport.receiver import MultiStreamReceiver
from dwcp.transport.sender import MultiStreamTCPTransport

__all__ = ["MultiStreamReceiver", "MultiStreamTCPTransport"]

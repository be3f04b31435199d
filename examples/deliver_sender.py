"""Send COUNT messages to 127.0.0.1:PORT with ``Manager.deliver()``; each is retried through
outages (the receiver killed and restarted, say) until the receiver confirms it.

    python3 examples/deliver_sender.py PORT COUNT

Prints how many were confirmed and how many failed; exits 1 if any failed.
"""

import sys

import dwcp

port, count = int(sys.argv[1]), int(sys.argv[2])
transport = dwcp.MultiStreamTCPTransport(("127.0.0.1", port), acknowledged=True)
with dwcp.Manager(transport, health_interval=0.5, initial_backoff=0.2) as manager:
    handles = [manager.deliver(b"%d" % i, timeout=60.0) for i in range(count)]
    manager.flush()
failed = sum(handle.exception() is not None for handle in handles)
print(f"confirmed {count - failed}, failed {failed}", flush=True)
sys.exit(1 if failed else 0)

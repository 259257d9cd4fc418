"""Who this process is, as written into every record it makes (``host:pid``)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache


@lru_cache(maxsize=1)
def _hostname() -> str:
    return socket.gethostname() or "localhost"


def process_identity() -> str:
    """Return ``host:pid`` for this process; the pid is read afresh, so a forked child is told apart."""
    return f"{_hostname()}:{os.getpid()}"

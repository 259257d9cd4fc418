"""Run by the wake-up tests as another OS process on one SQLite file.

``waker.py send URL``: open a backend, print the wall clock, send one message to ``loans`` / ``loan`` / ``42``,
close. ``waker.py commit URL``: open a backend, claim the one instance of ``loans`` / ``loan`` with work, print the
wall clock, commit its turn, close. ``waker.py listen URL``: open a backend, start waiting for work (which binds its
wake-up socket), print ``listening`` and wait until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime

from keel.backends import open_backend
from keel.backends.base import InstanceRef, NewMessage, StoreOptions, TurnCommit


async def send(url: str) -> None:
    backend = await open_backend(url, StoreOptions())
    try:
        sys.stdout.write(f"{time.time():.6f}\n")
        sys.stdout.flush()
        await backend.send(NewMessage(InstanceRef("loans", "loan", "42"), uuid.uuid4().hex, "{}"))
    finally:
        await backend.aclose()


async def commit(url: str) -> None:
    backend = await open_backend(url, StoreOptions())
    try:
        [claim] = await backend.claim("loans", ["loan"], worker="waker", lease_s=30, limit=1)
        sys.stdout.write(f"{time.time():.6f}\n")
        sys.stdout.flush()
        await backend.commit_turn(TurnCommit(claim, "{}", "waker", datetime.now(UTC), 0.0))
    finally:
        await backend.aclose()


async def listen(url: str) -> None:
    backend = await open_backend(url, StoreOptions())
    waiting = asyncio.create_task(backend.wait_for_work("loans", timeout_s=3600))
    await asyncio.sleep(0.1)
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    await waiting


if __name__ == "__main__":
    asyncio.run({"send": send, "commit": commit, "listen": listen}[sys.argv[1]](sys.argv[2]))

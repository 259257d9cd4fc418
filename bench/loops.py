"""The update loops the benchmark compares: keel's ``store.update`` and each engine's raw-driver twin.

A raw loop does what keel's engine does for one ``update`` (read the row, compare-and-swap the next
version, append it to the history and trim the history), with the same SQL or Lua keel ships, straight on
the driver: no key checks, no JSON limits, no pydantic, no thread hop or pool unless the driver needs one.
Every loop retries a lost compare-and-swap with the same jittered backoff as keel.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from datetime import UTC, datetime

import keel
from keel.backends.sqlite.database import QUERIES as SQLITE_QUERIES
from keel.backends.sqlite.location import database_path
from keel.identity import process_identity

HISTORY_LIMIT = 100


def _increment(n: int) -> int:
    return n + 1


def _backoff_s(attempt: int) -> float:
    return random.uniform(0, min(0.05, 0.001 * 2**attempt))


def keel_loop(url: str, key: str, stop_at: float) -> int:
    """``store.update`` in a loop until ``stop_at``; returns the updates committed."""

    async def run() -> int:
        done = 0
        async with keel.open_store(url, update_deadline_s=120, history_limit=HISTORY_LIMIT) as store:
            while time.time() < stop_at:
                await store.update(key, _increment, default=0)
                done += 1
        return done

    return asyncio.run(run())


def sqlite_raw_loop(url: str, key: str, stop_at: float) -> int:
    """The same update with the sqlite3 module, synchronously, on keel's own queries."""
    conn = sqlite3.connect(database_path(url), isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = FULL")
    writer = process_identity()
    done = 0
    attempt = 0
    while time.time() < stop_at:
        row = conn.execute(SQLITE_QUERIES["get_current"], {"key": key}).fetchone()
        live = row is not None and row[1] is not None
        params = {
            "key": key,
            "value": json.dumps(json.loads(row[1]) + 1 if live else 1),
            "expected": row[0] if live else None,
            "written_at": datetime.now(UTC).isoformat(),
            "writer": writer,
        }
        conn.execute("BEGIN IMMEDIATE")
        written = conn.execute(SQLITE_QUERIES["swap" if live else "create"], params).fetchone()
        if written is None:
            conn.execute("ROLLBACK")
            attempt += 1
            time.sleep(_backoff_s(attempt))
            continue
        version = written[0]
        conn.execute(SQLITE_QUERIES["append_history"], {**params, "version": version})
        if version > HISTORY_LIMIT:
            conn.execute(SQLITE_QUERIES["trim_history"], {"key": key, "oldest_dropped": version - HISTORY_LIMIT})
        conn.execute("COMMIT")
        attempt = 0
        done += 1
    conn.close()
    return done

"""The update loops the benchmark compares: keel's ``store.update`` and each engine's raw-driver twin.

A raw loop sends what keel sends for one ``update``, with the same SQL or Lua keel ships, straight on the
driver: no key checks, no JSON limits, no pydantic, no thread hop or pool. Like keel it remembers the version
it last wrote and compare-and-swaps from it (the history append and trim ride in the same statement, script
or transaction); when the swap loses, it reads the row afresh, backs off with keel's jittered delays if the
value it lost with was already fresh, and tries again. So the ratio keel / raw is keel's own overhead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from datetime import UTC, datetime

import keel
from keel.backends.sqlite.location import database_path
from keel.backends.sqlite.store import QUERIES as SQLITE_QUERIES
from keel.identity import process_identity

HISTORY_LIMIT = 100


def _increment(n: int) -> int:
    return n + 1


def _backoff_s(attempt: int) -> float:
    return random.uniform(0, min(0.05, 0.001 * 2**attempt))


def keel_loop(url: str, key: str, stop_at: float) -> int:
    """``store.update`` in a loop until ``stop_at``; returns the updates committed."""
    # The benchmark's Redis keeps nothing on disk; one warning per process would drown the figures.
    logging.getLogger("keel.backends.redis").setLevel(logging.ERROR)

    async def run() -> int:
        done = 0
        async with keel.open_store(url, update_deadline_s=120, history_limit=HISTORY_LIMIT) as store:
            while time.time() < stop_at:
                await store.update(key, _increment, default=0)
                done += 1
        return done

    return asyncio.run(run())


class _Counter:
    """The loop's memory: the version and value it last wrote, or None when it must read them."""

    def __init__(self) -> None:
        self.known: tuple[int | None, int] | None = None
        self.done = 0
        self.attempt = 0

    def lost(self, *, was_fresh: bool) -> float:
        """Forget what was known; return how long to back off (nothing if the value was only remembered)."""
        self.known = None
        self.attempt += 1
        return _backoff_s(self.attempt) if was_fresh else 0.0

    def won(self, version: int, value: int) -> None:
        self.known = (version, value)
        self.attempt = 0
        self.done += 1


class _SqliteRawUpdater:
    """One update at a time with the sqlite3 module on keel's own queries, as keel's engine does it."""

    def __init__(self, url: str) -> None:
        self.conn = sqlite3.connect(database_path(url), isolation_level=None, timeout=30, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.writer = process_identity()
        self.counter = _Counter()

    def step(self, key: str) -> float:
        """Try one update; return how long to back off before the next try."""
        counter, conn = self.counter, self.conn
        was_fresh = counter.known is None
        if counter.known is None:
            row = conn.execute(SQLITE_QUERIES["get_current"], {"key": key}).fetchone()
            live = row is not None and row[1] is not None
            counter.known = (row[0], json.loads(row[1])) if live else (None, 0)
        expected, value = counter.known
        params = {
            "key": key,
            "value": json.dumps(value + 1),
            "expected": expected,
            "written_at": datetime.now(UTC).isoformat(),
            "writer": self.writer,
        }
        conn.execute("BEGIN IMMEDIATE")
        written = conn.execute(SQLITE_QUERIES["create" if expected is None else "swap"], params).fetchone()
        if written is None:
            conn.execute("ROLLBACK")
            return counter.lost(was_fresh=was_fresh)
        version = written[0]
        conn.execute(SQLITE_QUERIES["append_history"], {**params, "version": version})
        if version > HISTORY_LIMIT:
            conn.execute(SQLITE_QUERIES["trim_history"], {"key": key, "oldest_dropped": version - HISTORY_LIMIT})
        conn.execute("COMMIT")
        counter.won(version, value + 1)
        return 0.0


def sqlite_raw_loop(url: str, key: str, stop_at: float) -> int:
    """The same update with the sqlite3 module, blocking the caller (an asyncio program could not)."""
    updater = _SqliteRawUpdater(url)
    while time.time() < stop_at:
        time.sleep(updater.step(key))
    updater.conn.close()
    return updater.counter.done


def sqlite_thread_loop(url: str, key: str, stop_at: float) -> int:
    """The same update from an event loop, each one run whole on a thread, as keel runs its SQLite calls."""
    from keel.backends.sqlite.thread import BlockingThread

    async def run() -> int:
        thread = BlockingThread("bench-sqlite")
        updater = await thread.call(lambda: _SqliteRawUpdater(url))
        while time.time() < stop_at:
            delay_s = await thread.call(lambda: updater.step(key))
            if delay_s:
                await asyncio.sleep(delay_s)
        await thread.call(updater.conn.close)
        thread.stop()
        return updater.counter.done

    return asyncio.run(run())


def postgres_raw_loop(url: str, key: str, stop_at: float) -> int:
    """The same update with psycopg on one autocommit connection, on keel's own statements."""
    import psycopg

    from keel.backends.postgres.migrate import QUERIES as PG_QUERIES

    async def run() -> int:
        writer = process_identity()
        counter = _Counter()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while time.time() < stop_at:
                was_fresh = counter.known is None
                if counter.known is None:
                    row = await (await conn.execute(PG_QUERIES["get"], {"key": key})).fetchone()
                    counter.known = (row[0], json.loads(row[1])) if row else (None, 0)
                expected, value = counter.known
                params = {
                    "key": key,
                    "value": json.dumps(value + 1),
                    "expected": expected,
                    "writer": writer,
                    "history_limit": HISTORY_LIMIT,
                }
                query = PG_QUERIES["create" if expected is None else "swap"]
                written = await (await conn.execute(query, params)).fetchone()
                if written is None:
                    await asyncio.sleep(counter.lost(was_fresh=was_fresh))
                    continue
                counter.won(written[0], value + 1)
        return counter.done

    return asyncio.run(run())


def redis_raw_loop(url: str, key: str, stop_at: float) -> int:
    """The same update with redis-py asyncio: keel's own write.lua by EVALSHA (HMGET when it must read)."""
    from keel.backends.redis.connection import make_client
    from keel.backends.redis.keys import RedisKeys
    from keel.backends.redis.lua import script_text

    async def run() -> int:
        # The same driver settings as keel (pool, timeouts, no resend): what is measured is keel's code.
        client = make_client(url, url)
        script = client.register_script(script_text("write.lua"))
        names = [RedisKeys().current(key), RedisKeys().history(key)]
        writer = process_identity()
        counter = _Counter()
        while time.time() < stop_at:
            was_fresh = counter.known is None
            if counter.known is None:
                fields: list[str | None] = await client.hmget(names[0], ["v", "d"])  # type: ignore[assignment]
                version, text = fields
                counter.known = (
                    (int(version), json.loads(text)) if version is not None and text is not None else (None, 0)
                )
            expected, value = counter.known
            args: list[str | int] = [
                "" if expected is None else expected,
                "0",
                json.dumps(value + 1),
                writer,
                HISTORY_LIMIT,
            ]
            reply = await script(keys=names, args=args)
            if reply[0] != 1:
                await asyncio.sleep(counter.lost(was_fresh=was_fresh))
                continue
            counter.won(int(reply[1]), value + 1)
        await client.aclose()
        return counter.done

    return asyncio.run(run())

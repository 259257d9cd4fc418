"""Wake-ups for idle workers: LISTEN/NOTIFY on one dedicated connection per backend, outside the pool.

How it works:

- ``send`` (and a commit or ``publish`` that sends messages) calls ``pg_notify(channel_for(schema, app), workflow)``
  in its own transaction, so the notification goes out when the message is committed. Channels are per app and per
  schema, like the tables; the payload names the workflow (a handler's delivery workflow ``on/HANDLER``).
- A waiter is woken only by notifications about the workflows its backend claims (``claiming``), or by any before
  its backend's first claim of the app: a worker that runs only some workflows of an app is not sent to claim for
  every message sent to the others. An empty payload wakes every waiter.
- A notification that arrives while no waiter is parked (the worker is claiming, or running turns) is not lost:
  ``claiming`` marks when a claim starts, and a ``wait()`` after it returns at once if a notification about the
  claimed workflows arrived since, because that notification's commit may have come after the claim's snapshot.
- The first ``wait()`` opens the listener connection and starts a pump task that owns it. The pump LISTENs on every
  channel a waiter asks for, wakes that channel's waiters for each notification, and keeps reading (so the server
  never queues notifications for it) until the backend closes.
- Notifications sent while a channel is not listened to are never delivered: before its LISTEN, or while the
  connection is down. So every LISTEN is followed by a check for claimable work (``has_work``) that wakes the
  channel's waiters if there is some; and when the connection is lost every waiter is woken at once, to re-poll.
  The pump reconnects at once if waiters remain, else when the next one comes.
- A durable timer notifies nobody, neither when it is sent nor when it falls due: waiters find it by polling (their
  ``timeout_s``), and ``has_work`` counts only visible work, so a far-future timer never makes idle workers spin.
- psycopg holds the connection's lock while it waits for notifications, so the pump waits in slices of
  ``SUBSCRIBE_POLL_S``, between which it LISTENs on the channels new waiters asked for.
- Pool connections are never held while waiting. Connection failures become ``BackendUnavailable`` through the
  store's error boundary; a waiter that needs a connection that cannot be opened gets that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from keel.backends.postgres.transactions import BROKER_QUERIES, channel_for
from keel.errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Collection

    from psycopg.rows import TupleRow

    from keel.backends.postgres.store import PostgresStore

logger = logging.getLogger(__name__)

#: How long a new waiter may wait before the pump LISTENs on its channel; also the pump's wait slice.
SUBSCRIBE_POLL_S = 0.1


class PostgresListener:
    """One LISTEN connection shared by every waiter of one backend."""

    def __init__(self, store: PostgresStore, schema: str) -> None:
        self._store = store
        self._schema = schema
        self._conninfo = store._settings.conninfo
        self._waiters: dict[str, dict[asyncio.Future[None], frozenset[str] | None]] = {}
        self._apps: dict[str, str] = {}  # channel -> app, for the has_work check
        self._listening: set[str] = set()  # channels LISTENed on the current connection
        # channel -> the workflows claimed from this backend (what wakes its waiters), and the stamp at the last
        # claim's start; channel -> payload -> the stamp of the last notification with that payload.
        self._claimed: dict[str, tuple[frozenset[str], int]] = {}
        self._heard: dict[str, dict[str, int]] = {}
        self._stamp = 0
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    def channel(self, app: str) -> str:
        """Return the channel that ``send`` notifies for ``app``."""
        return channel_for(self._schema, app)

    def claiming(self, app: str, workflows: Collection[str]) -> None:
        """Note that a claim of ``app``'s ``workflows`` starts now: what the next ``wait()`` for ``app`` waits for."""
        channel = self.channel(app)
        known, _ = self._claimed.get(channel, (frozenset(), 0))
        self._claimed[channel] = (known | frozenset(workflows), self._stamp)

    async def wait(self, app: str, *, timeout_s: float) -> None:
        """Return when ``app`` may have work, or after ``timeout_s``.

        Raises:
            BackendUnavailable: The listener connection cannot be opened, or the backend is closed.
        """
        if self._closed:
            raise BackendUnavailable(self._store.url, "the backend is closed", hint="open a new one")
        channel = self.channel(app)
        workflows, claimed_at = self._claimed.get(channel, (None, 0))
        if workflows is not None and self._heard_since(channel, workflows, claimed_at):
            return  # its commit may have come after the last claim's snapshot: look again at once
        self._apps[channel] = app
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, {})[waiter] = workflows
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="keel-postgres-listener")
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            return
        finally:
            del self._waiters[channel][waiter]

    async def aclose(self) -> None:
        """Stop the pump and close the connection; waiters return. Safe to call twice."""
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self._disconnect()
        self._wake_all()

    @property
    def backend_pid(self) -> int | None:
        """The server pid of the listener connection, if it is open; for tests and diagnostics."""
        return None if self._conn is None or self._conn.closed else self._conn.info.backend_pid

    async def _run(self) -> None:
        """Read notifications while connected, waiters or not (the server queues them for a reader that lags).

        After the connection is lost, reconnect at once if waiters remain, else end: the next waiter restarts it.
        """
        while self._has_waiters() or self._conn is not None:
            try:
                conn = await self._connect()
            except BackendUnavailable as exc:
                self._fail_all(exc)
                return
            try:
                await self._serve(conn)
            except (BackendUnavailable, psycopg.Error) as exc:
                logger.info("the LISTEN connection to %s was lost, waking every waiter: %s", self._store.url, exc)
                await self._disconnect()
                self._wake_all()  # notifications sent while it was down are lost: everyone re-polls

    async def _connect(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        async with self._store._driver_errors():
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        self._listening.clear()
        return self._conn

    async def _serve(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        while True:
            await self._subscribe(conn)
            async with self._store._driver_errors():
                async for notify in conn.notifies(timeout=SUBSCRIBE_POLL_S):
                    self._wake(notify.channel, notify.payload)

    async def _subscribe(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        """LISTEN on channels with waiters not yet listened to, then wake those that already have work."""
        for channel in [c for c, waiters in self._waiters.items() if waiters and c not in self._listening]:
            async with self._store._driver_errors():
                await conn.execute(sql.SQL(BROKER_QUERIES["listen"]).format(channel=sql.Identifier(channel)))
                self._listening.add(channel)
                cursor = await conn.execute(BROKER_QUERIES["has_work"], {"app": self._apps[channel]})
                found = await cursor.fetchone()
            if found is not None and found[0]:
                self._wake(channel)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._listening.clear()
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    def _has_waiters(self) -> bool:
        return any(not waiter.done() for waiters in self._waiters.values() for waiter in waiters)

    def _heard_since(self, channel: str, workflows: frozenset[str], stamp: int) -> bool:
        heard = self._heard.get(channel, {})
        return any(heard.get(name, 0) > stamp for name in (*workflows, ""))

    def _wake(self, channel: str, payload: str = "") -> None:
        """Wake the channel's waiters that ``payload`` (a workflow, or empty for any) concerns."""
        self._stamp += 1
        self._heard.setdefault(channel, {})[payload] = self._stamp
        for waiter, workflows in self._waiters.get(channel, {}).items():
            if not waiter.done() and (workflows is None or not payload or payload in workflows):
                waiter.set_result(None)

    def _wake_all(self) -> None:
        for channel in list(self._waiters):
            self._wake(channel)

    def _fail_all(self, exc: BackendUnavailable) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)

"""The PostgreSQL wake transport: LISTEN/NOTIFY on one dedicated connection per backend, outside the pool.

The waiters and the wake rule are the backend's ``keel.backends.wake.WakeGate``; this module only hears of work
and tells the gate (``wake``, ``wake_all``, ``fail_all``).

How it works:

- ``send`` (and a commit or ``publish`` that sends messages) calls ``pg_notify(channel_for(schema, app), workflow)``
  in its own transaction, so the notification goes out when the message is committed. Channels are per app and per
  schema, like the tables; the payload names the workflow (a handler's delivery workflow ``on/HANDLER``).
- The gate wakes a waiter only for notifications about the workflows its backend claims, or for any before its
  backend's first claim of the app: a worker that runs only some workflows of an app is not sent to claim for
  every message sent to the others. An empty payload concerns every workflow.
- A notification that arrives while no waiter is parked (the worker is claiming, or running turns) is not lost:
  the gate remembers it, and a wait after the claim returns at once if one about the claimed workflows arrived
  since the claim began, because that notification's commit may have come after the claim's snapshot.
- The first wait (``watch``) opens the listener connection and starts a pump task that owns it. The pump LISTENs on
  every channel a wait asks for, tells the gate of each notification, and keeps reading (so the server never
  queues notifications for it) until the backend closes.
- Notifications sent while a channel is not listened to are never delivered: before its LISTEN, or while the
  connection is down. So every LISTEN is followed by a check for claimable work (``has_work``) that wakes the
  channel's waiters if there is some; and when the connection is lost every waiter is woken at once, to re-poll.
  The pump reconnects at once if waiters remain, else when the next one comes.
- A durable timer notifies nobody, neither when it is sent nor when it falls due: waiters find it by polling (their
  ``timeout_s``), and ``has_work`` counts only visible work, so a far-future timer never makes idle workers spin.
- psycopg holds the connection's lock while it waits for notifications, so the pump waits in slices of
  ``SUBSCRIBE_POLL_S``, between which it LISTENs on the channels new waiters asked for.
- Pool connections are never held while waiting. Connection failures become ``BackendUnavailable`` through the
  engine's error boundary (``connection.py``); a waiter that needs a connection that cannot be opened gets that error.

The same connection hears of the ends of messages (``wait_for_end``, the backend's ``EndWaiters``), on a second
channel per app (``end_channel_for``) whose payload is the message id: workers never LISTEN on it. A wait marks its
message (``mark_waited``), and the commit, dead letter or skip that ends a marked message NOTIFYs in its own
transaction. Each LISTEN on an end channel, on a new connection or again after a reconnect, is followed by every
wait for that app reading its status again (``EndWaiters.recheck``): an end committed before the LISTEN took effect
notified no one here, and is found by that read, which also marks the message again (a restarted server may have
lost the mark; the reads after a NOTIFY only read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from keel.backends.postgres.transactions import BROKER_QUERIES, channel_for, end_channel_for
from keel.backends.tasks import cancel_and_wait
from keel.errors import BackendUnavailable

if TYPE_CHECKING:
    from psycopg.rows import TupleRow

    from keel.backends.ends import EndWaiters
    from keel.backends.postgres.connection import PostgresConnection
    from keel.backends.wake import WakeGate

logger = logging.getLogger(__name__)

#: How long a new waiter may wait before the pump LISTENs on its channel; also the pump's wait slice.
SUBSCRIBE_POLL_S = 0.1


class PostgresListener:
    """One LISTEN connection shared by every waiter of one backend, telling its gate what it hears."""

    def __init__(self, connection: PostgresConnection, schema: str, gate: WakeGate, ends: EndWaiters) -> None:
        self._pool = connection
        self._schema = schema
        self._gate = gate
        self._ends = ends
        self._conninfo = connection.settings.conninfo
        self._apps: dict[str, str] = {}  # channel -> app, of every app waited for
        self._end_apps: dict[str, str] = {}  # end channel -> app, of every app whose messages' ends were waited for
        self._listening: set[str] = set()  # channels LISTENed on the current connection
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._closed = False

    def channel(self, app: str) -> str:
        """Return the channel that ``send`` notifies for ``app``."""
        return channel_for(self._schema, app)

    def watch(self, app: str) -> None:
        """Hear of ``app``'s work from now on: LISTEN on its channel, starting the pump if it is not running."""
        if self._closed:
            return
        self._apps[self.channel(app)] = app
        self._start()

    def watch_ends(self, app: str) -> None:
        """Hear of the ends of ``app``'s messages from now on: LISTEN on its end channel, starting the pump if idle."""
        if self._closed:
            return
        self._end_apps.setdefault(end_channel_for(self._schema, app), app)
        self._start()

    def _start(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run(), name="keel-postgres-listener")

    async def aclose(self) -> None:
        """Stop the pump and close the connection; waiters return. Safe to call twice."""
        self._closed = True
        await cancel_and_wait(self._pump)
        await self._disconnect()

    @property
    def backend_pid(self) -> int | None:
        """The server pid of the listener connection, if it is open; for tests and diagnostics."""
        return None if self._conn is None or self._conn.closed else self._conn.info.backend_pid

    async def _run(self) -> None:
        """Read notifications while connected, waiters or not (the server queues them for a reader that lags).

        After the connection is lost, reconnect at once if waiters remain, else end: the next waiter restarts it.
        """
        while self._gate.waiting_apps() or self._ends.apps() or self._conn is not None:
            try:
                conn = await self._connect()
            except BackendUnavailable as exc:
                self._gate.fail_all(exc)
                self._ends.recheck()  # each read then fails too, or finds the end: the pool may still work
                return
            try:
                await self._serve(conn)
            except (BackendUnavailable, psycopg.Error) as exc:
                logger.info("the LISTEN connection to %s was lost, waking every waiter: %s", self._pool.url, exc)
                await self._disconnect()
                self._gate.wake_all()  # notifications sent while it was down are lost: everyone re-polls

    async def _connect(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        async with self._pool.driver_errors():
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        self._listening.clear()
        return self._conn

    async def _serve(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        while True:
            await self._subscribe(conn)
            async with self._pool.driver_errors():
                async for notify in conn.notifies(timeout=SUBSCRIBE_POLL_S):
                    self._heard(notify.channel, notify.payload)

    async def _subscribe(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        """LISTEN on channels with waiters not yet listened to, then wake those that already have work (or ends)."""
        waited = {self.channel(app) for app in self._gate.waiting_apps()}
        for channel in [c for c in self._apps if c in waited and c not in self._listening]:
            async with self._pool.driver_errors():
                await self._listen(conn, channel)
                cursor = await conn.execute(BROKER_QUERIES["has_work"], {"app": self._apps[channel]})
                found = await cursor.fetchone()
            if found is not None and found[0]:
                self._heard(channel)
        ending = self._ends.apps()
        for channel, app in [(c, a) for c, a in self._end_apps.items() if a in ending and c not in self._listening]:
            async with self._pool.driver_errors():
                await self._listen(conn, channel)
            self._ends.recheck(app)  # ends committed before this LISTEN notified no one here

    async def _listen(self, conn: psycopg.AsyncConnection[TupleRow], channel: str) -> None:
        await conn.execute(sql.SQL(BROKER_QUERIES["listen"]).format(channel=sql.Identifier(channel)))
        self._listening.add(channel)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._listening.clear()
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    def _heard(self, channel: str, payload: str = "") -> None:
        """Pass on what ``channel`` said: work about ``payload`` (a workflow, empty for any), or the end of a message.

        On an end channel ``payload`` is the message id.
        """
        app = self._apps.get(channel)
        if app is not None:
            self._gate.wake(app, payload or None)
        ended_app = self._end_apps.get(channel)
        if ended_app is not None:
            self._ends.heard(ended_app, payload)

"""One round trip per transaction: several prepared statements sent as one text, run as one implicit transaction.

Why: in psycopg's pipeline mode every statement is its own write to the socket and wakes the server's backend once; on
loopback that kernel and wake-up work, not the statements, was most of a write's cost (``bench/README.md``, "Where the
time goes"). A ``Script`` instead sends ``EXECUTE name(literal, ...); EXECUTE ...`` as one simple-query message: one
write, one wake-up, one answer. PostgreSQL runs the statements of such a message as one transaction (an error in any
rolls back all of them), and under read committed each still takes a fresh snapshot when it starts, so a statement that
follows a row lock sees everything committed before the lock was granted, exactly as in an explicit transaction. The
values are bound on the client: psycopg's ``ClientCursor`` quotes each one with libpq's ``PQescapeLiteral`` for the
connection, right whatever the server's settings.

The statements are ``PREPARE``d on each pooled connection (``prepare``: the pool's ``configure`` callback, and again
after psycopg dropped them), so the server parses and plans them once, not per call: plain text statements would be
planned every time, which cost more server CPU than the round trips saved. Only statements of keel's own
``broker.sql`` are prepared, under names of their own (``keel_<name>``), which never meet psycopg's automatically
prepared ``_pg3_*`` ones. A prepared statement lives in its session: a connection pooler in transaction mode
(PgBouncer) cannot serve these, as it cannot serve keel's LISTEN connection.

Parameter types are inferred by the server from how each statement uses them; where the inference would be wrong
(a number compared with an integer literal is taken for an integer), the SQL casts explicitly
(``%(delay_s)s::float8``). ``test_scripts.py`` checks every prepared parameter against the Python value it gets.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import psycopg

from keel.backends.postgres.transactions import BROKER_QUERIES

if TYPE_CHECKING:
    from typing import LiteralString

    from psycopg.rows import TupleRow

    _Connection = psycopg.AsyncConnection[TupleRow]

#: The statements of ``broker.sql`` that scripts run: the writes of sends, claims, group commits and settled turns.
SCRIPTED = (
    "lock_inboxes",
    "append",
    "lock_ready",
    "lease",
    "lock_instance",
    "lock_instances",
    "commit_turn",
    "record_step",
    "fail_turn",
    "retry_turn",
)

_PARAM = re.compile(r"%\((\w+)\)s")


class _Prepared:
    """One ``broker.sql`` statement as a ``PREPARE`` text and the ``EXECUTE`` template that calls it."""

    def __init__(self, name: str, query: str) -> None:
        self.names: list[str] = []
        body = _PARAM.sub(self._placeholder, query)
        self.statement = f"keel_{name}"
        self.prepare = f"PREPARE {self.statement} AS {body}"
        arguments = f"({', '.join(f'%({param})s' for param in self.names)})" if self.names else ""
        # Built from keel's own broker.sql names and the statement's parameter names: no input reaches it.
        self.execute: LiteralString = f"EXECUTE {self.statement}{arguments}"

    def _placeholder(self, found: re.Match[str]) -> str:
        if found.group(1) not in self.names:
            self.names.append(found.group(1))
        return f"${self.names.index(found.group(1)) + 1}"


#: Each scripted statement, by its ``broker.sql`` name.
PREPARED = {name: _Prepared(name, BROKER_QUERIES[name]) for name in SCRIPTED}


async def prepare(conn: _Connection) -> None:
    """Prepare the scripted statements ``conn`` does not hold (yet, or any more); the pool's ``configure`` callback.

    psycopg drops every prepared statement of a connection (``DEALLOCATE ALL``) when it rolls a transaction back,
    so a script that finds one missing calls this again.
    """
    cursor = await conn.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'keel\\_%'")
    held = {str(name) for (name,) in await cursor.fetchall()}
    missing = [p.prepare for p in PREPARED.values() if p.statement not in held]
    if missing:
        await conn.execute(";\n".join(missing).encode())


class Script:
    """Prepared statements queued to run as one transaction in one round trip; ``run`` returns each one's rows."""

    def __init__(self) -> None:
        self._calls: list[tuple[_Prepared, dict[str, Any]]] = []

    def add(self, name: str, params: dict[str, Any]) -> int:
        """Queue statement ``name`` of ``broker.sql`` with ``params``; return its index in ``run``'s answer."""
        self._calls.append((PREPARED[name], params))
        return len(self._calls) - 1

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, conn: _Connection) -> list[list[tuple[Any, ...]] | None]:
        """Run the queued statements as one transaction, committed when the answer comes back.

        Returns:
            For each statement in order, its rows, or None for one that returns none (no RETURNING).

        Raises:
            psycopg.Error: A statement failed; the whole transaction rolled back, nothing of it was written.
        """
        cursor = psycopg.AsyncClientCursor(conn)
        text = ";\n".join(cursor.mogrify(prepared.execute, params) for prepared, params in self._calls).encode()
        try:
            await cursor.execute(text)
        except psycopg.errors.InvalidSqlStatementName:
            # Dropped by a rollback of psycopg's (see prepare). The error rolled the whole script back: run it again.
            await prepare(conn)
            await cursor.execute(text)
        results: list[list[tuple[Any, ...]] | None] = []
        while True:
            returned = cursor.pgresult is not None and cursor.pgresult.status == psycopg.pq.ExecStatus.TUPLES_OK
            results.append(await cursor.fetchall() if returned else None)
            if not cursor.nextset():
                break
        if len(results) != len(self._calls):
            raise psycopg.InterfaceError(f"a script of {len(self._calls)} statements got {len(results)} answers")
        return results

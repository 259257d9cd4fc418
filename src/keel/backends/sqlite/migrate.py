"""The SQLite engine's schema: created on first use and brought up to date, in one transaction, by any process.

``schema.sql`` holds the steps: ``bootstrap`` runs every time (it creates ``keel_schema``), the others once each, in
order; ``keel_schema`` records the version reached. Released steps are never edited: a new version is a new step.
The file's write lock (``BEGIN IMMEDIATE``) serialises processes that open a new file at the same moment.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, TypeVar

from keel.backends._sql import load_queries
from keel.backends.sqlite.writes import rollback
from keel.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The schema bookkeeping statements (``queries.sql``).
_QUERIES = load_queries(__package__ or "keel.backends.sqlite", "queries.sql")

#: The schema steps (``schema.sql``); ``bootstrap`` runs every time, the rest once each, in this order.
_SCHEMA = load_queries(__package__ or "keel.backends.sqlite", "schema.sql")
MIGRATIONS = (
    _SCHEMA["store_v1"],
    _SCHEMA["runtime_v2"],
    _SCHEMA["runtime_v3"],
    _SCHEMA["runtime_v4"],
    _SCHEMA["runtime_v5"],
    _SCHEMA["runtime_v6"],
    _SCHEMA["runtime_v7"],
)

#: The schema version this code writes and reads, recorded in ``keel_schema`` under ``SCHEMA_COMPONENT``.
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA_COMPONENT = "store"


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the file to ``SCHEMA_VERSION`` in one transaction; the write lock serialises racing processes."""
    _in_transaction(conn, _apply_migrations)


def _apply_migrations(conn: sqlite3.Connection) -> None:
    _execute_script(conn, _SCHEMA["bootstrap"])
    found = conn.execute(_QUERIES["schema_version"], {"component": SCHEMA_COMPONENT}).fetchone()
    reached = 0 if found is None else int(found[0])
    if reached > SCHEMA_VERSION:
        raise ConfigurationError(
            f"this SQLite database has keel schema version {reached}, newer than this keel "
            f"understands ({SCHEMA_VERSION}); upgrade keel-runtime"
        )
    if reached == SCHEMA_VERSION:
        return
    for step in MIGRATIONS[reached:]:
        _execute_script(conn, step)
    conn.execute(_QUERIES["record_schema_version"], {"component": SCHEMA_COMPONENT, "version": SCHEMA_VERSION})
    logger.info("SQLite database migrated from schema version %d to %d", reached, SCHEMA_VERSION)


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it would commit the open transaction first, and the migration must be all or nothing.
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """Split a section on ';', keeping a trigger's ``BEGIN ... END`` body (which has ';' inside) in one piece."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    statements, pending = [], ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip().removesuffix(";").strip())
            pending = ""
    if pending.strip(" \n;"):
        statements.append(pending.strip().removesuffix(";").strip())
    return [s for s in statements if s]


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return result

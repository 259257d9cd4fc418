"""Helpers of the SQLite-only tests: a backend typed as SQLite, raw SQL on a connection of the test's own, and
files as older releases left them. Sending, claiming and committing come from ``tests._engine``.

The ``backend`` fixture built on these lives in this folder's ``conftest.py``.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from keel.backends import open_backend
from keel.backends._sql import load_queries
from keel.backends.base import StoreOptions
from keel.backends.sqlite.backend import SqliteBackend

if TYPE_CHECKING:
    from pathlib import Path

#: The released schema sections, exactly as keel wrote older files (released sections are never edited).
_SECTIONS = load_queries("keel.backends.sqlite", "schema.sql")


# --- Backends on a file of their own -----------------------------------------------------------------------


async def open_sqlite(url: str) -> SqliteBackend:
    """A SQLite backend on a connection of its own; the caller closes it."""
    backend = await open_backend(url, StoreOptions())
    assert isinstance(backend, SqliteBackend)
    return backend


def sql(url: str, query: str) -> list[tuple[object, ...]]:
    """Run one statement on a connection of the test's own, as another process would."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


# --- Files as older keel releases left them -----------------------------------------------------------------


def write_file(path: Path, *scripts: str) -> None:
    """Create or change the file at ``path`` by running ``scripts`` in order, as another program would."""
    with sqlite3.connect(path) as conn:
        for script in scripts:
            conn.executescript(script)


def write_version_file(path: Path, version: int, data: str) -> None:
    """A file as keel's schema ``version`` (2 or later) left it, with the SQL ``data`` run on it."""
    sections = ("bootstrap", "store_v1", *(f"runtime_v{n}" for n in range(2, version + 1)))
    write_file(path, *(_SECTIONS[section] for section in sections), data)

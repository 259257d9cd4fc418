"""The PostgreSQL engine's schema: the tables, created on first use and upgraded in one transaction.

``schema.sql`` holds the steps; ``bootstrap`` runs every time, the rest once each, in this order: version 1 is the
store's tables, version 2 the runtime's (``broker.py``), version 3 its step results and dead letters, version 4 its
durable timers, pruning and instance deletion, version 5 its event log, version 6 each instance's kind (workflow or
delivery), version 7 the mark of the messages a client waits for and the index claims read one workflow at a time.
``keel_schema`` records the version reached; an advisory lock (``lock_schema``) serialises processes starting together.
Opening the store alone creates the runtime's tables too: one schema version for the whole engine.
"""

from __future__ import annotations

import logging

import psycopg

from keel.backends._sql import load_queries
from keel.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: The engine's statements outside the broker's, by name (``queries.sql``): the store's and the schema bookkeeping.
QUERIES = load_queries(__package__ or __name__, "queries.sql")

#: The schema steps (``schema.sql``), by name.
_SCHEMA = load_queries(__package__ or __name__, "schema.sql")
MIGRATIONS = tuple(_SCHEMA[step] for step in ("store_v1", *(f"runtime_v{n}" for n in range(1, 7))))

#: The schema version this code needs, recorded in ``keel_schema`` under ``SCHEMA_COMPONENT``. The component keeps
#: the name it got when the store was all there was: it counts the steps of the whole engine's schema.
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA_COMPONENT = "store"


async def migrate(conninfo: str, masked_url: str) -> None:
    """Bring the tables to ``SCHEMA_VERSION`` in one transaction, serialised across processes.

    Raises:
        ConfigurationError: The schema cannot be created here, or was made by a newer keel.
    """
    try:
        async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
            await conn.execute(QUERIES["lock_schema"])
            await conn.execute(_SCHEMA["bootstrap"])
            cursor = await conn.execute(QUERIES["schema_version"], {"component": SCHEMA_COMPONENT})
            row = await cursor.fetchone()
            reached = 0 if row is None else int(row[0])
            if reached > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the keel tables at {masked_url!r} are at schema version {reached}, newer than this "
                    f"keel knows ({SCHEMA_VERSION}); upgrade keel"
                )
            for step in MIGRATIONS[reached:]:
                await conn.execute(step)
            if reached < SCHEMA_VERSION:
                params = {"component": SCHEMA_COMPONENT, "version": SCHEMA_VERSION}
                await conn.execute(QUERIES["record_schema_version"], params)
                logger.info("keel tables at %s migrated to schema version %d", masked_url, SCHEMA_VERSION)
    except (psycopg.errors.InvalidSchemaName, psycopg.errors.InsufficientPrivilege) as exc:
        raise ConfigurationError(
            f"cannot create keel's tables at {masked_url!r}: {' '.join(str(exc).split())} (the schema named "
            "by the URL's search_path must exist, and the user must be allowed to create tables in it)"
        ) from exc

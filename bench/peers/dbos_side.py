"""DBOS's side of bench.peers: the same three no-op steps as a DBOS workflow, each step checkpointed before the next.

Run by the bench with the Python of DBOS's own virtual environment (``bench/.peers/dbos``), which has no keel:
``python -m bench.peers.dbos_side CONFIG_JSON``. DBOS runs a workflow in the process that starts it, so this one
process is both the caller and the executor. On SQLite every connection is set to ``synchronous=FULL``; on
PostgreSQL the server's ``synchronous_commit`` is read back and reported.
"""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from dbos import DBOS, SetWorkflowID

from bench.peers import drive

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@DBOS.step()
async def noop(i: int) -> int:
    return i


@DBOS.workflow()
async def three_steps(n: int) -> int:
    for i in range(drive.STEPS_PER_WORKFLOW):
        await noop(i)
    return n


class DbosCaller:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.versions = {name: metadata.version(name) for name in ("dbos", "sqlalchemy", "psycopg")}
        self.settings = settings

    async def send(self, n: int) -> Any:
        with SetWorkflowID(f"run-{n}"):
            return await DBOS.start_workflow_async(three_steps, n)

    async def wait(self, sent: Any) -> None:
        await sent.get_result()

    async def call(self, n: int) -> None:
        with SetWorkflowID(f"run-{n}"):
            await three_steps(n)

    async def check(self, n: int) -> int:
        return len(await DBOS.list_workflow_steps_async(f"run-{n}"))


def _durable_sqlite(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA synchronous=FULL")


def _durability(engine: sa.Engine, url: str) -> dict[str, Any]:
    with engine.connect() as conn:
        if url.startswith("sqlite"):
            return {
                "synchronous": conn.exec_driver_sql("PRAGMA synchronous").scalar(),
                "journal_mode": conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
            }
        return {"synchronous_commit": conn.exec_driver_sql("SHOW synchronous_commit").scalar()}


@contextlib.asynccontextmanager
async def open_caller(config: dict[str, Any]) -> AsyncIterator[DbosCaller]:
    url = config["url"]
    if url.startswith("sqlite"):
        # Every engine DBOS creates gets the setting on each new connection, before DBOS uses it.
        sa.event.listen(sa.Engine, "connect", _durable_sqlite)
    DBOS(config={"name": "bench-peers", "system_database_url": url, "log_level": "WARNING"})
    logging.getLogger("dbos").setLevel(logging.WARNING)
    DBOS.launch()
    try:
        probe = sa.create_engine(url)
        settings = {"api": "async workflows and steps", **_durability(probe, url)}
        probe.dispose()
        yield DbosCaller(settings)
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    drive.main(open_caller)

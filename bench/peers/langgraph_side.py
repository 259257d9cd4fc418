"""LangGraph's side of bench.peers: three no-op nodes in a line, checkpointed with ``durability="sync"``.

Run by the bench with the Python of LangGraph's own virtual environment (``bench/.peers/langgraph``), which has
no keel: ``python -m bench.peers.langgraph_side CONFIG_JSON``. Each run is a fresh thread id; with
``durability="sync"`` the checkpoint of each step is written before the next step starts. The graph runs in the
caller's process, which is therefore both caller and executor. SQLite: the async saver on one aiosqlite
connection set to ``synchronous=FULL`` (the saver itself turns on WAL); PostgreSQL: the async saver on a pool of
16 connections, the server's ``synchronous_commit`` read back and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypedDict, cast

from langgraph.graph import END, START, StateGraph

from bench.peers import drive

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: Connections in the PostgreSQL saver's pool: one per caller of the largest closed loop.
POOL_SIZE = 16


class Progress(TypedDict):
    n: int
    steps: int


async def noop(state: Progress) -> dict[str, int]:
    return {"steps": state["steps"] + 1}


def _graph(checkpointer: Any) -> Any:
    builder = StateGraph(Progress)
    previous = START
    for i in range(drive.STEPS_PER_WORKFLOW):
        builder.add_node(f"step-{i}", noop)
        builder.add_edge(previous, f"step-{i}")
        previous = f"step-{i}"
    builder.add_edge(previous, END)
    return builder.compile(checkpointer=checkpointer)


def _thread(n: int) -> dict[str, Any]:
    return {"configurable": {"thread_id": f"run-{n}"}}


class LangGraphCaller:
    def __init__(self, graph: Any, settings: dict[str, Any], engine: str) -> None:
        self.graph = graph
        saver = f"langgraph-checkpoint-{engine}"
        driver = "aiosqlite" if engine == "sqlite" else "psycopg"
        self.versions = {name: metadata.version(name) for name in ("langgraph", "langgraph-checkpoint", saver, driver)}
        self.settings = {"api": "ainvoke, durability='sync'", **settings}

    async def send(self, n: int) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self.call(n))

    async def wait(self, sent: asyncio.Task[Any]) -> None:
        await sent

    async def call(self, n: int) -> None:
        await self.graph.ainvoke({"n": n, "steps": 0}, _thread(n), durability="sync")

    async def check(self, n: int) -> int:
        snapshot = await self.graph.aget_state(_thread(n))
        return int(snapshot.values.get("steps", -1))


@contextlib.asynccontextmanager
async def _sqlite_saver(path: str) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with aiosqlite.connect(path) as conn:
        await conn.execute("PRAGMA synchronous=FULL")
        saver = AsyncSqliteSaver(conn)
        await saver.setup()
        settings = {}
        for pragma in ("synchronous", "journal_mode"):
            async with conn.execute(f"PRAGMA {pragma}") as cursor:
                row = await cursor.fetchone()
                settings[pragma] = row[0] if row else None
        yield saver, settings


@contextlib.asynccontextmanager
async def _postgres_saver(url: str) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(url, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs=kwargs, open=False) as pool:
        saver = AsyncPostgresSaver(pool)
        await saver.setup()
        async with pool.connection() as conn:
            row = cast("dict[str, Any] | None", await (await conn.execute("SHOW synchronous_commit")).fetchone())
        yield saver, {"synchronous_commit": row["synchronous_commit"] if row else None, "pool": POOL_SIZE}


@contextlib.asynccontextmanager
async def open_caller(config: dict[str, Any]) -> AsyncIterator[LangGraphCaller]:
    engine = config["engine"]
    opened = _sqlite_saver(config["path"]) if engine == "sqlite" else _postgres_saver(config["url"])
    async with opened as (saver, settings):
        yield LangGraphCaller(_graph(saver), settings, engine)


if __name__ == "__main__":
    drive.main(open_caller)

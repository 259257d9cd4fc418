"""keel's side of bench.peers: a client that sends to fresh instances and waits for each commit.

The turns run in real `keel worker` processes the bench started on the same URL (``bench/peers/keel_app.py``).
Run by the bench: ``python -m bench.peers.keel_side CONFIG_JSON``.
"""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bench.peers import drive
from bench.peers.keel_app import Go, app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from keel import Client

WORKFLOW = "three_steps"


class KeelCaller:
    def __init__(self, client: Client, engine: str) -> None:
        self.client = client
        self.versions = {"keel": metadata.version("keel-runtime"), **_driver_versions(engine)}
        self.settings: dict[str, Any] = {"workers": "keel worker --concurrency 64", "wait": "client.wait"}

    async def send(self, n: int) -> tuple[str, str]:
        workflow_id = f"run-{n}"
        return workflow_id, await self.client.send(WORKFLOW, workflow_id, Go(n=n))

    async def wait(self, sent: tuple[str, str]) -> None:
        workflow_id, message_id = sent
        await self.client.wait(WORKFLOW, workflow_id, message_id, timeout_s=600)

    async def call(self, n: int) -> None:
        await self.wait(await self.send(n))

    async def check(self, n: int) -> int:
        state = await self.client.state(WORKFLOW, f"run-{n}")
        return -1 if state is None else int(state.value.steps)


def _driver_versions(engine: str) -> dict[str, str]:
    package = {"postgres": "psycopg", "redis": "redis"}.get(engine)
    return {package: metadata.version(package)} if package else {}


@contextlib.asynccontextmanager
async def open_caller(config: dict[str, Any]) -> AsyncIterator[KeelCaller]:
    # The private Redis keeps an append-only file; nothing to warn about, and nothing else should be printed.
    logging.getLogger("keel").setLevel(logging.ERROR)
    async with app.client(url=config["url"]) as client:
        yield KeelCaller(client, config["engine"])


if __name__ == "__main__":
    drive.main(open_caller)

"""Whether a server answers a fresh connection, asked once for every call that wants to know at the same time.

A call that waited past its bound for a pooled connection asks this to tell load from an outage. Under load many
calls time out together; were each to open a connection of its own to ask, hundreds would at once, and a server
that limits its clients (PostgreSQL's ``max_connections``) would refuse them, an outage made by the question.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from keel.backends.tasks import cancel_and_wait

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


class SharedProbe:
    """Runs ``attempt`` (None if the server answered, else why not) at most once at a time, for every caller."""

    def __init__(self, attempt: Callable[[], Awaitable[str | None]]) -> None:
        self._attempt = attempt
        self._running: asyncio.Task[str | None] | None = None

    async def failure(self) -> str | None:
        """Why the server does not answer a fresh connection, or None if it does: the running attempt's answer."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._run(), name="keel-probe")
        # Shielded: a caller cancelled while waiting must not cancel the answer the others wait for.
        return await asyncio.shield(self._running)

    async def aclose(self) -> None:
        """Stop a running attempt."""
        await cancel_and_wait(self._running)

    async def _run(self) -> str | None:
        return await self._attempt()

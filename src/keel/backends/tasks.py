"""Background tasks of the engines (wake pumps, end listeners, probes): stopping one, written once."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` (None or a finished one: nothing to do) and wait until it has stopped.

    Its own cancellation is swallowed; any other error it ends with is raised, as awaiting it would.
    """
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

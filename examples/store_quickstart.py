"""The versioned store in thirty lines: run it with `python examples/store_quickstart.py [URL]`.

Without a URL it uses a SQLite file in a temporary folder; pass postgresql://... or redis://... to share
the state between machines.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel

import keel


class LoanState(BaseModel):
    step: int = 0
    approved: bool = False


def advance(state: LoanState) -> LoanState:
    state.step += 1
    return state


async def main(url: str) -> None:
    async with keel.open_store(url) as store:
        created = await store.put("loan:42", LoanState(), expected_version=None)
        try:
            await store.put("loan:42", LoanState(step=9), expected_version=None)
        except keel.StaleWriteError as exc:
            print("refused:", exc)
        updated = await store.update("loan:42", advance, model=LoanState)
        print(f"version {created.version} -> {updated.version}: {updated.value!r}")
        for entry in await store.history("loan:42"):
            print(f"  v{entry.version} by {entry.writer} at {entry.written_at:%H:%M:%S}: {entry.value}")
        await store.delete("loan:42", expected_version=updated.version)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            asyncio.run(main(f"sqlite:///{Path(folder) / 'example.db'}"))

"""Run by the G1 test in separate processes: N updates of one key, printing the versions they returned."""

from __future__ import annotations

import asyncio
import json
import sys

import keel


async def main(url: str, key: str, count: int) -> None:
    versions = []
    async with keel.open_store(url, update_deadline_s=120) as store:
        for _ in range(count):
            written = await store.update(key, lambda n: n + 1, default=0)
            versions.append(written.version)
    sys.stdout.write(json.dumps(versions) + "\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))

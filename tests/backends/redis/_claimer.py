"""Run by the cross-process claim test: claim and commit turns until the app has been idle for a while.

Prints one JSON line: the (workflow_id, message_id, fencing_token, version) of every turn this process committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime

from keel.backends import open_backend
from keel.backends.base import StoreOptions, TurnCommit

APP = "loans"
IDLE_ROUNDS = 5


async def main(url: str) -> None:
    worker = f"claimer:{os.getpid()}"
    committed: list[tuple[str, str, int, int]] = []
    backend = await open_backend(url, StoreOptions())
    try:
        idle = 0
        while idle < IDLE_ROUNDS:
            claims = await backend.claim(APP, ["loan"], worker=worker, lease_s=30, limit=2)
            if not claims:
                idle += 1
                await backend.wait_for_work(APP, timeout_s=0.1)
                continue
            idle = 0
            for claim in claims:
                seen = json.loads(claim.state_json or '{"n": 0}')
                state = json.dumps({"n": seen["n"] + 1})
                version = await backend.commit_turn(TurnCommit(claim, state, worker, datetime.now(UTC), 0.0))
                committed.append((claim.instance.workflow_id, claim.message_id, claim.fencing_token, version))
    finally:
        await backend.aclose()
    sys.stdout.write(json.dumps(committed) + "\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

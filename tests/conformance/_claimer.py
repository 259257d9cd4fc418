"""Run by the cross-process claim test: a bare worker loop on one backend URL, printing every turn it committed.

Prints ``ready`` once its backend is open, then claims and commits (state ``{"n": n + 1}``) until it has been
idle for ``IDLE_S``, and prints its turns as JSON: ``[[workflow_id, fencing_token, message_id, version, attempt]]``.
A LeaseLostError ends it with a traceback and a non-zero exit status.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime

from keel.backends import open_backend
from keel.backends.base import Claim, StoreOptions, TurnCommit

APP = "crowd"
IDLE_S = 1.5


async def main(url: str) -> None:
    backend = await open_backend(url, StoreOptions())
    worker = f"claimer-{os.getpid()}"
    held: list[list[object]] = []
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < IDLE_S:
            claims = await backend.claim(APP, ["job"], worker=worker, lease_s=60, limit=2)
            if not claims:
                await backend.wait_for_work(APP, timeout_s=0.2)
                continue
            idle_since = time.monotonic()
            for claim in claims:
                version = await backend.commit_turn(_next_state(claim, worker))
                held.append([claim.instance.workflow_id, claim.fencing_token, claim.message_id, version, claim.attempt])
    finally:
        await backend.aclose()
    sys.stdout.write(json.dumps(held) + "\n")


def _next_state(claim: Claim, worker: str) -> TurnCommit:
    seen = json.loads(claim.state_json or '{"n": 0}')
    return TurnCommit(claim, json.dumps({"n": seen["n"] + 1}), worker, datetime.now(UTC), 0.0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

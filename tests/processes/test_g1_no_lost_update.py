"""G1 across processes: several real processes updating one key lose nothing and share one version sequence."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import keel

pytestmark = [pytest.mark.processes, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("incrementer.py")
PROCESSES = 4
UPDATES_EACH = 500


async def _read(url: str, key: str) -> keel.Versioned[Any] | None:
    async with keel.open_store(url) as store:
        return await store.get(key)


def test_four_processes_times_500_updates_end_at_2000(shared_backend_url: str) -> None:
    # Open once first so that the processes race on updates, not on creating the schema.
    assert asyncio.run(_read(shared_backend_url, "g1")) is None
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), shared_backend_url, "g1", str(UPDATES_EACH)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    returned = sorted(v for versions in outputs for v in versions)
    assert returned == list(range(1, PROCESSES * UPDATES_EACH + 1))
    for versions in outputs:
        assert versions == sorted(versions)  # each process saw its own writes in order
    final = asyncio.run(_read(shared_backend_url, "g1"))
    assert final is not None
    assert (final.value, final.version) == (PROCESSES * UPDATES_EACH, PROCESSES * UPDATES_EACH)

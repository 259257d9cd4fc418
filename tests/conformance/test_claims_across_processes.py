"""Claims from separate OS processes on one database, on every engine that several processes can share (G2)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from keel.backends.base import InstanceRef
from tests._engine import opened, send

CLAIMER = Path(__file__).with_name("_claimer.py")
INSTANCES, PER_INSTANCE, PROCESSES = 12, 5, 3


def job(n: int) -> InstanceRef:
    return InstanceRef("crowd", "job", str(n))


@pytest.mark.processes
@pytest.mark.slow
async def test_claimers_in_separate_processes_run_every_message_exactly_once_in_order(shared_backend_url: str) -> None:
    async with opened(shared_backend_url):
        pass  # the processes race on claims, not on creating the schema
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(CLAIMER), shared_backend_url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip() == "ready"
    async with opened(shared_backend_url) as sender:
        sent: dict[str, list[str]] = {str(n): [] for n in range(INSTANCES)}
        for _ in range(PER_INSTANCE):
            for n in range(INSTANCES):
                sent[str(n)].append(await send(sender, job(n)))
        outputs = [await asyncio.wait_for(proc.communicate(), 120) for proc in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()
        per_process = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
        held = [turn for turns in per_process for turn in turns]
        assert sorted(t[2] for t in held) == sorted(m for ids in sent.values() for m in ids)  # each exactly once
        assert len({(t[0], t[1]) for t in held}) == len(held)  # no token handed out twice
        assert {t[4] for t in held} == {1}  # no claim ever took over a live lease
        assert all(turns for turns in per_process)  # every process took part
        for workflow_id, message_ids in sent.items():
            mine = sorted((t for t in held if t[0] == workflow_id), key=lambda t: t[3])
            assert [t[2] for t in mine] == message_ids  # in send order
            assert [t[3] for t in mine] == list(range(1, PER_INSTANCE + 1))
            state = await sender.state(job(int(workflow_id)))
            assert state is not None and json.loads(state.value_json or "null") == {"n": PER_INSTANCE}

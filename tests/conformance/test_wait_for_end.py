"""Waiting for a message's end, on every engine: ``wait_for_end`` wakes on the engine's announcement, and misses none.

Ends are made through a second backend on the same database (``other``), as a worker in another process would make
them; the subprocess tests (``tests/processes/test_wait_processes.py``) do it with a real ``keel worker``. Each
engine's safety re-read is minutes away in these tests unless a test shortens it, so a wake-up that came only from
it would fail them: what they measure is the announcement.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from keel.backends.base import MessageStatus
from keel.errors import BackendUnavailable
from tests._engine import APP, claim_one, commit_of, failure_of, opened, ref, send

if TYPE_CHECKING:
    from keel.backends.base import Backend, MessageInfo

#: Long enough for any engine's listener to have started hearing (a LISTEN or SUBSCRIBE takes one slice of 0.1 s).
SETTLE_S = 0.4

#: How soon after an end its wait must return. Typically a few milliseconds; the margin is for a loaded machine.
PROMPT_S = 0.3


@pytest.fixture(autouse=True)
def no_safety_rereads(backend: Backend) -> None:
    """Put the waits' safety re-read out of reach, so that only announcements can end a wait early."""
    backend.broker.ends.recheck_s = 300.0  # type: ignore[attr-defined]


async def timed_end(backend: Backend, message_id: str, timeout_s: float = 10.0) -> tuple[MessageInfo | None, float]:
    started = time.monotonic()
    info = await backend.wait_for_end(APP, message_id, timeout_s=timeout_s)
    return info, time.monotonic() - started


async def parked(backend: Backend, message_id: str) -> asyncio.Task[MessageInfo | None]:
    """A wait for ``message_id`` on ``backend``, parked by the time this returns."""
    waiting = asyncio.create_task(backend.wait_for_end(APP, message_id, timeout_s=30))
    await asyncio.sleep(SETTLE_S)
    assert not waiting.done()
    return waiting


async def ended_within(waiting: asyncio.Task[MessageInfo | None]) -> tuple[MessageInfo | None, float]:
    started = time.monotonic()
    info = await asyncio.wait_for(waiting, 30)
    return info, time.monotonic() - started


async def test_a_commit_by_another_backend_wakes_a_wait_promptly(backend: Backend, other: Backend) -> None:
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    await other.commit_turn(commit_of(await claim_one(other), {"n": 1}))
    info, elapsed = await ended_within(waiting)
    assert elapsed < PROMPT_S
    assert info is not None
    assert (info.status, info.state_version, info.instance) == (MessageStatus.done, 1, ref())


async def test_a_commit_through_the_same_backend_wakes_its_wait_promptly(backend: Backend) -> None:
    message_id = await send(backend, ref())
    waiting = await parked(backend, message_id)
    await backend.commit_turn(commit_of(await claim_one(backend)))
    info, elapsed = await ended_within(waiting)
    assert elapsed < PROMPT_S
    assert info is not None and info.status is MessageStatus.done


async def test_a_dead_letter_ends_the_wait_at_once_with_its_error(backend: Backend, other: Backend) -> None:
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    await other.fail_turn(failure_of(await claim_one(other), "ValueError: no"))
    info, elapsed = await ended_within(waiting)
    assert elapsed < PROMPT_S
    assert info is not None
    assert (info.status, info.error) == (MessageStatus.failed, "ValueError: no")


async def test_a_dead_letter_retried_and_failed_again_wakes_a_new_wait(backend: Backend, other: Backend) -> None:
    message_id = await send(other, ref())
    await other.fail_turn(failure_of(await claim_one(other)))
    info, elapsed = await timed_end(backend, message_id)
    assert info is not None and info.status is MessageStatus.failed
    assert elapsed < PROMPT_S  # it has ended (failed): a wait returns at once
    await other.resolve_dead_letter(ref(), skip=False)  # pending again
    waiting = await parked(backend, message_id)
    await other.fail_turn(failure_of(await claim_one(other), "ValueError: again"))
    info, elapsed = await ended_within(waiting)
    assert elapsed < PROMPT_S
    assert info is not None and (info.status, info.error) == (MessageStatus.failed, "ValueError: again")
    assert await other.resolve_dead_letter(ref(), skip=True) == message_id
    info, elapsed = await timed_end(backend, message_id)
    assert info is not None and info.status is MessageStatus.skipped
    assert elapsed < PROMPT_S


async def test_a_wait_started_after_the_end_returns_at_once(backend: Backend, other: Backend) -> None:
    message_id = await send(other, ref())
    await other.commit_turn(commit_of(await claim_one(other)))
    info, elapsed = await timed_end(backend, message_id)
    assert elapsed < PROMPT_S
    assert info is not None and info.status is MessageStatus.done


async def test_an_end_between_the_send_and_the_wait_is_not_missed(backend: Backend, other: Backend) -> None:
    """The wait reads the status after it registers: an end committed just before it began counts."""
    for n in range(20):
        message_id = await send(other, ref(f"race-{n}"))
        claim = await claim_one(other)
        committing = asyncio.create_task(other.commit_turn(commit_of(claim)))
        info, elapsed = await timed_end(backend, message_id)
        await committing
        assert elapsed < PROMPT_S, n
        assert info is not None and info.status is MessageStatus.done


async def test_a_wait_returns_the_pending_status_at_its_timeout_and_none_for_an_unknown_message(
    backend: Backend,
) -> None:
    message_id = await send(backend, ref())
    info, elapsed = await timed_end(backend, message_id, timeout_s=0.5)
    assert 0.45 <= elapsed < 0.5 + PROMPT_S
    assert info is not None and info.status is MessageStatus.pending
    unknown, elapsed = await timed_end(backend, "no-such-message")
    assert unknown is None and elapsed < PROMPT_S


async def test_a_lost_announcement_is_made_up_for_by_the_safety_reread(backend: Backend, other: Backend) -> None:
    ends = backend.broker.ends  # type: ignore[attr-defined]
    ends.recheck_s = 0.5
    ends.heard = lambda app, message_id: None  # every announcement about a message is lost from now on
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    await other.commit_turn(commit_of(await claim_one(other)))
    info, elapsed = await ended_within(waiting)
    assert elapsed < 0.5 + PROMPT_S  # the re-read, not the 30 s timeout
    assert info is not None and info.status is MessageStatus.done


async def test_hundreds_of_concurrent_waits_share_one_backend_and_all_wake(backend: Backend, other: Backend) -> None:
    count = 300
    sent = [await send(other, ref(f"many-{n}")) for n in range(count)]
    waits = [asyncio.create_task(backend.wait_for_end(APP, message_id, timeout_s=60)) for message_id in sent]
    await asyncio.sleep(1.0)
    assert not any(wait.done() for wait in waits)  # parked, holding no pooled connection between reads
    claims = await other.claim(APP, ["loan"], worker="w1", lease_s=30, limit=count)
    assert len(claims) == count
    await asyncio.gather(*(other.commit_turn(commit_of(claim)) for claim in claims))
    committed = time.monotonic()
    infos = await asyncio.wait_for(asyncio.gather(*waits), 30)
    assert time.monotonic() - committed < 5.0
    assert [info.status if info else None for info in infos] == [MessageStatus.done] * count
    # The backend still serves other calls at once: the waits left its connections free.
    assert (await backend.message(APP, sent[0])) is not None


async def test_closing_the_backend_ends_a_parked_wait(backend_url: str) -> None:
    async with opened(backend_url) as waiter:
        message_id = await send(waiter, ref())
        waiting = asyncio.create_task(waiter.wait_for_end(APP, message_id, timeout_s=30))
        await asyncio.sleep(SETTLE_S)
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(waiting, 5)

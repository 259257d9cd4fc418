"""The broker's contract (inboxes, leases, fencing tokens, the atomic turn commit), on every engine."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

import keel
from keel.backends.base import Backend, MessageStatus, NewMessage, Pruned, TurnFailure
from tests._engine import APP, LEASE_S, claim_one, commit_of, failure_of, ref, send, step_of


async def test_first_claim_starts_from_no_state_at_version_zero(backend: Backend) -> None:
    message_id = await send(backend, ref(), {"amount": 1000})
    claim = await claim_one(backend)
    assert (claim.instance, claim.message_id, json.loads(claim.payload_json)) == (ref(), message_id, {"amount": 1000})
    assert (claim.state_json, claim.state_version, claim.attempt) == (None, 0, 1)
    assert claim.fencing_token >= 1
    assert await backend.state(ref()) is None


async def test_lease_expiry_comes_from_the_backend_clock_and_lease_length(backend: Backend) -> None:
    await send(backend, ref(), {})
    before = datetime.now(UTC)
    claim = await claim_one(backend, lease_s=30)
    assert before + timedelta(seconds=25) < claim.lease_expires_at < before + timedelta(seconds=40)


async def test_commit_writes_state_completes_the_message_and_records_the_turn(backend: Backend) -> None:
    message_id = await send(backend, ref(), {"amount": 1})
    claim = await claim_one(backend)
    version = await backend.commit_turn(commit_of(claim, {"step": 1}))
    assert version == 1
    state = await backend.state(ref())
    assert state is not None
    assert (json.loads(state.value_json or "null"), state.version, state.writer) == ({"step": 1}, 1, "w1")
    info = await backend.message(APP, message_id)
    assert info is not None
    assert (info.status, info.state_version, info.instance) == (MessageStatus.done, 1, ref())
    [turn] = await backend.turns(ref(), limit=10)
    assert (turn.message_id, turn.worker, turn.attempt, turn.fencing_token) == (
        message_id,
        "w1",
        1,
        claim.fencing_token,
    )
    assert (turn.version_read, turn.version_written, turn.outcome) == (0, 1, "committed")
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5) == []


async def test_turns_run_in_send_order_and_see_the_last_committed_state(backend: Backend) -> None:
    ids = [await send(backend, ref(), {"n": n}) for n in range(4)]
    tokens = []
    for n, message_id in enumerate(ids):
        claim = await claim_one(backend)
        assert claim.message_id == message_id
        assert claim.state_version == n
        assert json.loads(claim.state_json or "null") == (None if n == 0 else {"seen": n})
        tokens.append(claim.fencing_token)
        await backend.commit_turn(commit_of(claim, {"seen": n + 1}))
    assert tokens == sorted(set(tokens))  # a fresh, larger token for every claim


async def test_an_instance_under_lease_is_not_claimed_again(backend: Backend) -> None:
    await send(backend, ref(), {"n": 1})
    await send(backend, ref(), {"n": 2})
    await claim_one(backend, worker="w1")
    assert await backend.claim(APP, ["loan"], worker="w2", lease_s=LEASE_S, limit=5) == []


async def test_concurrent_claims_never_hand_out_one_instance_twice(backend: Backend) -> None:
    for n in range(10):
        await send(backend, ref(str(n)), {"n": n})
    batches = await asyncio.gather(
        *(backend.claim(APP, ["loan"], worker=f"w{i}", lease_s=LEASE_S, limit=3) for i in range(6))
    )
    claimed = [c.instance for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed)) == 10


async def test_claims_take_the_oldest_message_first_and_honour_the_limit(backend: Backend) -> None:
    for n in (3, 1, 2):
        await send(backend, ref(str(n)), {"n": n})
    first = await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=2)
    assert [c.instance.workflow_id for c in first] == ["3", "1"]
    rest = await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=2)
    assert [c.instance.workflow_id for c in rest] == ["2"]


async def test_claims_only_take_the_asked_workflows_of_the_asked_app(backend: Backend) -> None:
    await send(backend, ref("1", workflow="chat"), {})
    await send(backend, ref("1", app="other-app"), {})
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5) == []
    [chat] = await backend.claim(APP, ["loan", "chat"], worker="w1", lease_s=LEASE_S, limit=5)
    assert chat.instance == ref("1", workflow="chat")


async def test_repeated_idempotency_key_returns_the_first_id_and_enqueues_nothing(backend: Backend) -> None:
    first = await send(backend, ref(), {"n": 1}, key="req-1")
    again = await send(backend, ref(), {"n": 1}, key="req-1")
    other_instance = await send(backend, ref("43"), {"n": 3}, key="req-1")
    assert again == first != other_instance
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim, {}))
    assert [c.instance for c in await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5)] == [
        ref("43")
    ]


async def test_an_idempotency_key_sent_again_with_another_payload_is_a_conflict_that_appends_nothing(
    backend: Backend,
) -> None:
    first = await send(backend, ref(), {"n": 1}, key="req-1")
    other = NewMessage(ref(), uuid.uuid4().hex, json.dumps({"n": 2}), "req-1")
    with pytest.raises(keel.IdempotencyConflictError) as caught:
        await backend.send(other)
    assert (caught.value.key, caught.value.first_id, caught.value.app) == ("req-1", first, APP)
    assert caught.value.instance == "loan/42"
    assert all(part in str(caught.value) for part in ("'req-1'", first, "loan/42"))
    assert await backend.message(APP, other.message_id) is None
    assert await send(backend, ref(), {"n": 1}, key="req-1") == first  # the first payload still repeats silently
    claim = await claim_one(backend)
    assert (claim.message_id, json.loads(claim.payload_json)) == (first, {"n": 1})  # the first message intact
    await backend.commit_turn(commit_of(claim, {}))
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5) == []  # nothing behind it


async def test_sending_the_same_message_twice_appends_it_once(backend: Backend) -> None:
    message = NewMessage(ref(), uuid.uuid4().hex, json.dumps({"n": 1}))
    assert await backend.send(message) == await backend.send(message) == message.message_id
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim, {}))
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5) == []


async def test_a_commit_under_a_superseded_token_is_rejected_and_changes_nothing(backend: Backend) -> None:
    message_id = await send(backend, ref(), {"n": 1})
    zombie = await claim_one(backend, worker="zombie", lease_s=0.2)
    await asyncio.sleep(0.4)
    owner = await claim_one(backend, worker="owner")
    assert owner.fencing_token > zombie.fencing_token
    assert owner.message_id == message_id and owner.attempt == 2
    with pytest.raises(keel.LeaseLostError) as caught:
        await backend.commit_turn(commit_of(zombie, {"by": "zombie"}, worker="zombie"))
    assert caught.value.fencing_token == zombie.fencing_token
    assert await backend.state(ref()) is None
    info = await backend.message(APP, message_id)
    assert info is not None and info.status is MessageStatus.pending
    assert await backend.commit_turn(commit_of(owner, {"by": "owner"}, worker="owner")) == 1
    state = await backend.state(ref())
    assert state is not None and json.loads(state.value_json or "null") == {"by": "owner"}


async def test_a_commit_after_the_lease_expired_is_rejected_even_if_nobody_took_over(backend: Backend) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.4)
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.commit_turn(commit_of(claim, {"late": True}))
    assert await backend.state(ref()) is None


async def test_renew_extends_live_leases_and_reports_lost_ones(backend: Backend) -> None:
    await send(backend, ref("a"), {})
    await send(backend, ref("b"), {})
    kept = await claim_one(backend, lease_s=0.5)
    lost = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.3)
    assert await backend.renew([kept, lost], lease_s=1.0) == [True, False]
    await asyncio.sleep(0.4)  # past kept's first expiry, within the renewed lease
    assert await backend.commit_turn(commit_of(kept, {})) == 1


async def test_release_makes_the_instance_claimable_at_once(backend: Backend) -> None:
    await send(backend, ref(), {})
    first = await claim_one(backend, lease_s=60)
    await backend.release(first)
    second = await claim_one(backend, worker="w2")
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    assert second.fencing_token > first.fencing_token
    await backend.release(first)  # a stale release changes nothing
    with pytest.raises(keel.LeaseLostError):
        await backend.commit_turn(commit_of(first, {}))
    assert await backend.commit_turn(commit_of(second, {}, worker="w2")) == 1


async def test_a_failed_turn_pauses_the_instance_and_keeps_later_messages(backend: Backend) -> None:
    failing = await send(backend, ref(), {"n": 1})
    later = await send(backend, ref(), {"n": 2})
    await send(backend, ref("other"), {"n": 3})
    claim = await claim_one(backend)
    await backend.fail_turn(TurnFailure(claim, "Traceback...\nValueError: boom", "w1", datetime.now(UTC), 0.1))
    info = await backend.message(APP, failing)
    assert info is not None and info.status is MessageStatus.failed and "boom" in (info.error or "")
    pending = await backend.message(APP, later)
    assert pending is not None and pending.status is MessageStatus.pending
    claims = await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5)
    assert [c.instance for c in claims] == [ref("other")]  # the paused instance is skipped, others go on
    [turn] = await backend.turns(ref(), limit=5)
    assert (turn.outcome, turn.version_written) == ("failed", None)
    assert "boom" in (turn.error or "")


async def test_unknown_message_is_none(backend: Backend) -> None:
    assert await backend.message(APP, "no-such-message") is None


async def test_state_keeps_its_version_sequence_across_many_turns(backend: Backend) -> None:
    for n in range(12):
        await send(backend, ref(), {"n": n})
        claim = await claim_one(backend)
        assert await backend.commit_turn(commit_of(claim, {"n": n})) == n + 1
    state = await backend.state(ref())
    assert state is not None and state.version == 12
    assert len(await backend.turns(ref(), limit=5)) == 5


async def test_wait_for_work_wakes_on_a_send_and_times_out_otherwise(backend: Backend) -> None:
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=0.3)
    assert 0.2 <= time.monotonic() - started < 2.0

    async def send_soon() -> None:
        await asyncio.sleep(0.2)
        await send(backend, ref(), {})

    sender = asyncio.create_task(send_soon())
    started = time.monotonic()
    await backend.wait_for_work(APP, timeout_s=10)
    assert time.monotonic() - started < 2.0
    await sender


async def test_step_results_are_replayed_to_the_next_claim_of_the_message(backend: Backend) -> None:
    await send(backend, ref(), {})
    first = await claim_one(backend, lease_s=0.3)
    assert first.steps == {}
    await backend.record_step(step_of(first, "check-eligibility", {"ok": True}))
    await backend.record_step(step_of(first, "check-eligibility", {"ok": False}))  # the first result stands
    await backend.record_step(step_of(first, "score", 0.75))
    await asyncio.sleep(0.5)
    second = await claim_one(backend)
    assert second.attempt == 2
    assert {k: json.loads(v) for k, v in second.steps.items()} == {"check-eligibility": {"ok": True}, "score": 0.75}
    await backend.commit_turn(commit_of(second, {}))
    await send(backend, ref(), {})
    assert (await claim_one(backend)).steps == {}  # steps belong to their message


async def test_a_step_record_under_a_lost_lease_is_rejected(backend: Backend) -> None:
    await send(backend, ref(), {})
    zombie = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.4)
    with pytest.raises(keel.LeaseLostError, match="expired"):
        await backend.record_step(step_of(zombie, "pay", {"paid": 1}))
    owner = await claim_one(backend, worker="owner")
    with pytest.raises(keel.LeaseLostError, match="fencing token"):
        await backend.record_step(step_of(zombie, "pay", {"paid": 2}))
    assert owner.steps == {}
    await backend.release(owner)
    assert (await claim_one(backend)).steps == {}


async def test_a_retry_holds_the_instance_and_keeps_its_message_first(backend: Backend) -> None:
    first_id = await send(backend, ref(), {"n": 1})
    await send(backend, ref(), {"n": 2})
    await send(backend, ref("other"), {"n": 3})
    claim = await claim_one(backend)
    await backend.retry_turn(failure_of(claim), delay_s=0.6)
    others = await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5)
    assert [c.instance for c in others] == [ref("other")]  # held back, while other instances go on
    with pytest.raises(keel.LeaseLostError):
        await backend.commit_turn(commit_of(claim, {}))  # a retried attempt cannot commit afterwards
    await backend.release(claim)  # nor cut its hold short
    assert [c.instance for c in await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5)] == []
    await asyncio.sleep(0.8)
    again = await claim_one(backend)
    assert (again.message_id, again.attempt) == (first_id, 2)
    info = await backend.message(APP, first_id)
    assert info is not None and info.status is MessageStatus.pending
    [turn] = await backend.turns(ref(), limit=5)
    assert (turn.outcome, turn.attempt, turn.version_written) == ("retry", 1, None)
    assert "flaky" in (turn.error or "")


async def test_a_retry_under_a_lost_lease_is_rejected(backend: Backend) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend, lease_s=0.2)
    await asyncio.sleep(0.4)
    with pytest.raises(keel.LeaseLostError):
        await backend.retry_turn(failure_of(claim), delay_s=10)
    assert (await claim_one(backend)).attempt == 2  # not held for 10 s


async def test_dead_letters_are_listed_and_a_retry_runs_the_message_again_first(backend: Backend) -> None:
    dead_id = await send(backend, ref(), {"n": 1})
    later_id = await send(backend, ref(), {"n": 2})
    claim = await claim_one(backend)
    await backend.fail_turn(failure_of(claim, "Traceback...\nValueError: for good"))
    [dead] = await backend.dead_letters(APP, limit=10)
    assert (dead.instance, dead.message_id, dead.attempts) == (ref(), dead_id, 1)
    assert "for good" in dead.error and dead.failed_at.tzinfo is not None
    assert await backend.dead_letters("another-app", limit=10) == []
    assert await backend.resolve_dead_letter(ref(), skip=False) == dead_id
    again = await claim_one(backend)
    assert (again.message_id, again.attempt) == (dead_id, 1)
    assert await backend.dead_letters(APP, limit=10) == []
    await backend.commit_turn(commit_of(again, {"n": 1}))
    assert (await claim_one(backend)).message_id == later_id


async def test_a_skipped_dead_letter_is_recorded_and_the_instance_goes_on(backend: Backend) -> None:
    dead_id = await send(backend, ref(), {"n": 1})
    later_id = await send(backend, ref(), {"n": 2})
    await backend.fail_turn(failure_of(await claim_one(backend)))
    assert await backend.resolve_dead_letter(ref(), skip=True) == dead_id
    info = await backend.message(APP, dead_id)
    assert info is not None and info.status is MessageStatus.skipped
    assert (await claim_one(backend)).message_id == later_id
    assert await backend.dead_letters(APP, limit=10) == []


async def test_resolving_an_instance_that_is_not_paused_does_nothing(backend: Backend) -> None:
    assert await backend.resolve_dead_letter(ref("never-seen"), skip=False) is None
    await send(backend, ref(), {})
    assert await backend.resolve_dead_letter(ref(), skip=True) is None
    assert (await claim_one(backend)).attempt == 1


async def test_a_committed_claim_cannot_be_renewed(backend: Backend) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim, {}))
    assert await backend.renew([claim], lease_s=LEASE_S) == [False]


async def test_a_delayed_message_waits_for_its_time_without_blocking_later_ones(backend: Backend) -> None:
    timer = await send(backend, ref(), {"n": "timer"}, delay_s=0.8)
    later = await send(backend, ref(), {"n": "later"})
    claim = await claim_one(backend)
    assert claim.message_id == later  # sent after the timer, visible before it
    await backend.commit_turn(commit_of(claim, {}))
    assert await backend.claim(APP, ["loan"], worker="w1", lease_s=LEASE_S, limit=5) == []
    await asyncio.sleep(1.0)
    assert (await claim_one(backend)).message_id == timer


async def test_delayed_messages_run_in_the_order_they_become_visible(backend: Backend) -> None:
    slow = await send(backend, ref(), {"n": 1}, delay_s=0.9)
    quick = await send(backend, ref(), {"n": 2}, delay_s=0.3)
    await asyncio.sleep(1.1)
    first = await claim_one(backend)
    assert first.message_id == quick
    await backend.commit_turn(commit_of(first, {}))
    assert (await claim_one(backend)).message_id == slow


async def test_prune_removes_finished_records_and_never_anything_undelivered(backend: Backend) -> None:
    done = await send(backend, ref("a"), {"n": 1})
    await backend.commit_turn(commit_of(await claim_one(backend), {}))
    keyed = await send(backend, ref("a"), {"n": 2}, key="req-1")
    await backend.commit_turn(commit_of(await claim_one(backend), {}))
    dead = await send(backend, ref("b"), {"n": 3})
    await backend.fail_turn(failure_of(await claim_one(backend)))
    waiting = await send(backend, ref("b"), {"n": 4})
    timer = await send(backend, ref("c"), {"n": 5}, delay_s=3600)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    pruned = await backend.prune(APP, finished_before=soon, keys_before=soon - timedelta(days=7))
    assert (pruned.messages, pruned.turns) == (1, 3)
    assert await backend.message(APP, done) is None
    for kept in (keyed, dead, waiting, timer):
        assert await backend.message(APP, kept) is not None
    assert await send(backend, ref("a"), {"n": 2}, key="req-1") == keyed  # the key still deduplicates
    assert [d.message_id for d in await backend.dead_letters(APP, limit=5)] == [dead]
    state = await backend.state(ref("a"))
    assert state is not None and state.version == 2  # state is never pruned
    pruned = await backend.prune(APP, finished_before=soon, keys_before=soon)
    assert pruned.messages == 1
    assert await send(backend, ref("a"), {"n": 7}, key="req-1") != keyed  # past its window, the key is free again


async def test_prune_keeps_records_newer_than_the_cut_off(backend: Backend) -> None:
    done = await send(backend, ref(), {})
    await backend.commit_turn(commit_of(await claim_one(backend), {}))
    past = datetime.now(UTC) - timedelta(minutes=5)
    assert await backend.prune(APP, finished_before=past, keys_before=past) == Pruned(0, 0)
    assert await backend.message(APP, done) is not None
    assert len(await backend.turns(ref(), limit=5)) == 1


async def test_delete_instance_removes_everything_it_owns(backend: Backend) -> None:
    first = await send(backend, ref(), {"n": 1}, key="k")
    await backend.commit_turn(commit_of(await claim_one(backend), {"n": 1}))
    queued = await send(backend, ref(), {"n": 2})
    held = await claim_one(backend)
    other = await send(backend, ref("other"), {"n": 3})
    assert await backend.delete_instance(ref()) is True
    assert await backend.state(ref()) is None
    assert await backend.turns(ref(), limit=5) == []
    assert await backend.message(APP, first) is None and await backend.message(APP, queued) is None
    with pytest.raises(keel.LeaseLostError):
        await backend.commit_turn(commit_of(held, {"n": 2}))
    assert await backend.state(ref()) is None
    assert await send(backend, ref(), {"n": 4}, key="k") != first  # its idempotency keys went with it
    assert await backend.message(APP, other) is not None
    assert await backend.delete_instance(ref("never-seen")) is False

"""Redis-only behaviour of events: the keys of the event log, one script per commit with its outbox, the fenced
commit that writes nothing, prune's event batches and whole delivery instances, and the schema step from 4 to 5.
What every engine shares is in tests/conformance/test_events_broker.py and test_events_log.py."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from redis.crc import key_slot

import keel
from keel.backends import open_backend
from keel.backends.base import NewMessage, Pruned, StoreOptions
from keel.backends.redis import cleanup
from keel.backends.redis.migrate import STORE_SCHEMA_VERSION
from tests._engine import APP, ack_of, claim_one, commit_of, failure_of, new_event, ref, send
from tests.backends.redis._support import STORE_LOGGER, count_commands, reopen, server_now_us, snapshot

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from keel.backends.base import Backend
    from keel.backends.redis.backend import RedisBackend

pytestmark = pytest.mark.redis


async def test_event_keys_land_in_the_documented_layout(backend: Backend, raw: Redis) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend)
    await backend.commit_turn(commit_of(claim, {"n": 1}))
    before_us = await server_now_us(raw)
    assert await backend.publish(new_event(("mail", "audit"), event_id="e{1}", key="k-1")) == "e{1}"
    await backend.commit_turn(ack_of(await claim_one(backend, ("on/mail",))))
    await send(backend, ref(), {})
    source = await claim_one(backend)
    await backend.commit_turn(commit_of(source, {"n": 2}, events=(new_event((), event_id="e2", source=source),)))

    event = await raw.hgetall("keel:event:{loans}:e{1}")
    assert before_us <= int(event.pop("a")) <= await server_now_us(raw)
    assert event == {"q": "2", "y": "Shipped", "p": '{"order": "o1"}', "h": '["mail", "audit"]', "k": "k-1"}
    second = await raw.hgetall("keel:event:{loans}:e2")
    assert (second["q"], second["h"], second["m"]) == ("6", "[]", source.message_id)
    assert (second["sa"], second["sw"], second["si"]) == ("loans", "loan", "42")
    assert await raw.zrange("keel:events:{loans}", 0, -1, withscores=True) == [("e{1}", 2.0), ("e2", 6.0)]
    assert await raw.zrange("keel:evkeyed:{loans}", 0, -1) == ["e{1}"]
    assert await raw.zrange("keel:evtime:{loans}", 0, -1) == ["e2"]
    assert await raw.hgetall("keel:evidem:{loans}") == {"k-1": "e{1}"}
    # Deliveries are ordinary instances of the workflow "on/HANDLER", the event id as workflow id.
    mail, audit = "loans/on%2Fmail/e%7B1%7D", "loans/on%2Faudit/e%7B1%7D"
    assert await raw.smembers(f"keel:ids:{{{audit}}}") == {"e{1}-audit"}
    assert await raw.hget(f"keel:msg:{{{mail}}}:e{{1}}-mail", "s") == "done"
    assert not await raw.exists(f"keel:states:{{{mail}}}")  # the acknowledgement wrote no state
    assert await raw.hget(f"keel:inst:{{{mail}}}", "v") is None
    assert [row.event_id for row in await backend.events(APP, limit=5)] == ["e2", "e{1}"]
    app_keys = [str(name) for name in await raw.keys("keel:ev*") if "{loans}" in str(name)]
    assert len(app_keys) == 6
    assert {key_slot(name.encode()) for name in app_keys} == {key_slot(b"loans")}


async def test_a_commit_with_sends_and_events_is_one_script_call(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend)
    sent = count_commands(monkeypatch, backend.store.connection.client)
    outbox = (NewMessage(ref("b"), "m-b", "{}"), NewMessage(ref("c"), "m-c", "{}", "k", 5.0))
    events = (new_event(("mail", "audit"), event_id="e1"), new_event(("mail",), event_id="e2", key="once"))
    await backend.commit_turn(commit_of(claim, {}, sends=outbox, events=events))
    await backend.publish(new_event(("audit",), event_id="e3"))
    await backend.events(APP, limit=10)
    assert sent == ["EVALSHA"] * 3
    claimed = await backend.claim(APP, ["loan", "on/mail", "on/audit"], worker="w1", lease_s=5, limit=10)
    assert sorted(c.message_id for c in claimed) == ["e1-audit", "e1-mail", "e2-mail", "e3-audit", "m-b"]


async def test_a_fenced_commit_with_an_outbox_changes_no_key(backend: Backend, raw: Redis) -> None:
    await send(backend, ref(), {})
    claim = await claim_one(backend)
    await backend.release(claim)
    before = await snapshot(raw)
    commit = commit_of(claim, {}, sends=(NewMessage(ref("b"), "m-b", "{}"),), events=(new_event(event_id="e1"),))
    with pytest.raises(keel.LeaseLostError, match="released"):
        await backend.commit_turn(commit)
    assert await snapshot(raw) == before


async def test_prune_deletes_a_finished_delivery_instance_whole(backend: Backend, raw: Redis) -> None:
    await backend.publish(new_event(event_id="e1"))
    await backend.commit_turn(ack_of(await claim_one(backend, ("on/mail",))))
    await backend.publish(new_event(event_id="e2"))
    failed = await claim_one(backend, ("on/mail",))
    await backend.fail_turn(failure_of(failed))
    await backend.resolve_dead_letter(failed.instance, skip=True)
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune(APP, finished_before=later, keys_before=later) == Pruned(messages=2, events=2)
    # Nothing of either delivery is left, and no fencing token floor was kept for them.
    assert sorted(await raw.keys("*")) == ["keel:schema", "keel:seq:{loans}", "keel:wake:{loans}"]


async def test_prune_keeps_a_delivery_instance_that_holds_another_message(backend: Backend, raw: Redis) -> None:
    await backend.publish(new_event(event_id="e1"))
    claim = await claim_one(backend, ("on/mail",))
    await send(backend, claim.instance, {"extra": True}, message_id="m-extra")  # not keel's doing, but possible
    await backend.commit_turn(ack_of(claim))
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await backend.prune(APP, finished_before=later, keys_before=later) == Pruned(1, turns=1, events=1)
    assert await raw.smembers("keel:ids:{loans/on%2Fmail/e1}") == {"m-extra"}
    assert (await claim_one(backend, ("on/mail",))).message_id == "m-extra"


async def test_prune_removes_events_in_batches(backend: Backend, raw: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cleanup, "PRUNE_BATCH", 2)
    for n in range(3):
        await backend.publish(new_event((), event_id=f"plain-{n}"))
        await backend.publish(new_event((), event_id=f"keyed-{n}", key=f"k{n}"))
    now = datetime.now(UTC) + timedelta(seconds=5)
    pruned = await backend.prune(APP, finished_before=now, keys_before=now - timedelta(days=1))
    assert pruned == Pruned(events=3)  # the keyed ones stay while their keys deduplicate
    assert await raw.hlen("keel:evidem:{loans}") == 3
    assert await backend.prune(APP, finished_before=now, keys_before=now) == Pruned(events=3)
    assert sorted(await raw.keys("*")) == ["keel:schema", "keel:seq:{loans}"]


async def test_the_schema_step_from_4_records_6_and_rewrites_nothing_written_with_kinds(
    redis_url: str, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    opened = await open_backend(redis_url, StoreOptions())
    try:
        await send(opened, ref("a"), {}, key="k")
        await send(opened, ref("b"), {})
        await opened.commit_turn(commit_of(await claim_one(opened), {"n": 1}))
        await opened.fail_turn(failure_of(await claim_one(opened)))
    finally:
        await opened.aclose()
    await raw.hset("keel:schema", "store", "4")
    written = await snapshot(raw)
    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        opened = await open_backend(redis_url, StoreOptions())
    try:
        assert any("upgraded from schema 4 to 7" in r.getMessage() for r in caplog.records if r.name == STORE_LOGGER)
        assert await raw.hget("keel:schema", "store") == str(STORE_SCHEMA_VERSION) == "7"
        # Its instances have their kind already (this keel wrote them): upgrade_6.lua keeps it.
        written["keel:schema"] = ("hash", -1, {"store": "7"})
        assert await snapshot(raw) == written
        # The data runs on, and gets an event log.
        assert await opened.publish(new_event(event_id="e1")) == "e1"
        assert await opened.commit_turn(ack_of(await claim_one(opened, ("on/mail",)))) == 0
        assert [row.event_id for row in await opened.events(APP, limit=5)] == ["e1"]
        assert await opened.resolve_dead_letter(ref("b"), skip=True) is not None
    finally:
        await opened.aclose()
    before = await snapshot(raw)
    await reopen(redis_url)  # at schema 7 already: nothing changes
    assert await snapshot(raw) == before

"""Redis-only behaviour of instance kinds: the layout 5 -> 6 upgrade, which writes each instance's kind."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from keel.backends import open_backend
from keel.backends.base import InstanceKind, InstanceRef, NewMessage, StoreOptions, TurnCommit
from keel.backends.redis import migrate
from keel.backends.redis.keys import RedisKeys, instance_member
from keel.backends.redis.migrate import STORE_SCHEMA_VERSION, upgrade_layout
from tests._engine import APP, claim_one, commit_of, ref, send
from tests.backends.redis._support import MIGRATE_LOGGER, prefixed_url, snapshot

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from keel.backends.base import Backend


def delivery(event_id: str) -> InstanceRef:
    return InstanceRef(APP, "on/mail", event_id)


async def _write_layout_5(url: str, raw: Redis, keys: RedisKeys) -> None:
    """Workflow instance loan/a and deliveries on/mail/e0..e2, each with one done message, as layout 5 kept them."""
    opened = await open_backend(url, StoreOptions())
    try:
        await send(opened, ref("a"), {})
        await opened.commit_turn(commit_of(await claim_one(opened), None))
        for n in range(3):
            message = NewMessage(delivery(f"e{n}"), f"e{n}-mail", "{}", kind=InstanceKind.delivery)
            await opened.send(message)
        for claim in await opened.claim(APP, ["on/mail"], worker="w1", lease_s=5, limit=10):
            await opened.commit_turn(TurnCommit(claim, None, "w1", datetime.now(UTC), 0.01))
    finally:
        await opened.aclose()
    # Layout 5 had no kind in an instance's hash.
    for instance in (ref("a"), *(delivery(f"e{n}") for n in range(3))):
        assert await raw.hdel(keys.instance(instance_member(instance)), "kind") == 1
    await raw.hset(keys.schema, "store", "5")


async def _token_after_resend(backend: Backend, instance: InstanceRef, kind: InstanceKind) -> int:
    await backend.send(NewMessage(instance, f"again-{instance.workflow_id}", json.dumps({}), kind=kind))
    [claim] = await backend.claim(APP, [instance.workflow], worker="w1", lease_s=5, limit=1)
    return claim.fencing_token


@pytest.mark.parametrize("prefix", ["keel:", "we*rd[1]?:"])
async def test_the_schema_step_from_5_writes_each_instances_kind_and_prune_goes_by_it(
    redis_url: str, raw: Redis, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(migrate, "SCAN_COUNT", 2)  # several SCAN batches, so several upgrade scripts
    url, keys = prefixed_url(redis_url, prefix), RedisKeys(prefix)
    await _write_layout_5(url, raw, keys)
    await raw.hset("keel-unrelated:inst:{loans/on%2Fmail/x}", mapping={"tok": "1"})
    with caplog.at_level(logging.INFO, logger=MIGRATE_LOGGER):
        opened = await open_backend(url, StoreOptions())
    try:
        assert await raw.hget(keys.schema, "store") == str(STORE_SCHEMA_VERSION) == "7"
        assert any("4 instance(s) given a kind for schema 6" in r.getMessage() for r in caplog.records)
        assert await raw.hget(keys.instance(instance_member(ref("a"))), "kind") == "workflow"
        for n in range(3):
            assert await raw.hget(keys.instance(instance_member(delivery(f"e{n}"))), "kind") == "delivery"
        assert await raw.hgetall("keel-unrelated:inst:{loans/on%2Fmail/x}") == {"tok": "1"}
        upgraded = await snapshot(raw)
        await upgrade_layout(raw, keys, 5, url=url)  # idempotent: a racing process's second run changes nothing
        assert await snapshot(raw) == upgraded

        soon = datetime.now(UTC) + timedelta(seconds=5)
        pruned = await opened.prune(APP, finished_before=soon, keys_before=soon)
        assert pruned.messages == 4
        # The deliveries went whole, hash and all; the workflow instance keeps its hash and its token.
        for n in range(3):
            assert not await raw.exists(keys.instance(instance_member(delivery(f"e{n}"))))
        assert await raw.hget(keys.instance(instance_member(ref("a"))), "tok") == "1"
        assert await _token_after_resend(opened, ref("a"), InstanceKind.workflow) == 2
        assert await _token_after_resend(opened, delivery("e0"), InstanceKind.delivery) == 1
    finally:
        await opened.aclose()

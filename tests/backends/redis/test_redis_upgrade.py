"""The schema step from layout 3 to 4 on Redis: a database written by keel at schema 3 (inbox lists, ready sets by
sequence number, no message times) is dated and indexed in place, and runs on with timers, prune and delete."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import pytest

from keel.backends import open_backend
from keel.backends.base import InstanceRef, NewMessage, StoreOptions, TurnCommit
from keel.backends.redis import migrate
from keel.backends.redis.keys import RedisKeys, instance_member
from keel.backends.redis.migrate import STORE_SCHEMA_VERSION, upgrade_layout
from tests.backends.redis._support import MIGRATE_LOGGER, micros, prefixed_url, reopen, server_now, snapshot

if TYPE_CHECKING:
    from redis.asyncio import Redis

pytestmark = pytest.mark.redis

STARTED_US = 1_700_000_000_000_000
#: Done messages of one more instance, enough that the app's message index is a real hash table, which HSCAN
#: reads in several batches (a small hash, up to hash-max-listpack-entries, comes back whole).
BULK = 600


class Layout3:
    """Writes what keel at schema 3 left, through the key names (unchanged since) of ``RedisKeys``."""

    def __init__(self, raw: Redis, keys: RedisKeys, app: str) -> None:
        self.raw, self.keys, self.app = raw, keys, app
        self.seq = 0
        self.seqs: dict[str, int] = {}

    def ref(self, workflow_id: str) -> InstanceRef:
        return InstanceRef(self.app, "loan", workflow_id)

    def member(self, workflow_id: str) -> str:
        return instance_member(self.ref(workflow_id))

    async def message(self, workflow_id: str, message_id: str, status: str = "pending", **extra: str) -> None:
        self.seq += 1
        self.seqs[message_id] = self.seq
        member = self.member(workflow_id)
        fields: dict[Any, Any] = {"p": "{}", "s": status, "q": self.seq, "i": member}
        fields.update({"n": "0" if status == "pending" else "1", **extra})
        await self.raw.hset(self.keys.message(member, message_id), mapping=fields)
        await self.raw.hset(self.keys.message_index(self.app), message_id, member)

    async def turn(self, workflow_id: str, message_id: str, n: int, outcome: str = "committed") -> None:
        record = {
            "message_id": message_id,
            "worker": "old:1",
            "attempt": 1,
            "fencing_token": n,
            "version_read": n - 1,
            "version_written": n if outcome == "committed" else None,
            "started_at_us": STARTED_US + n * 1_000_000,
            "duration_s": 0.25,
            "outcome": outcome,
            "error": None if outcome == "committed" else "boom",
        }
        await self.raw.lpush(self.keys.turns(self.member(workflow_id)), json.dumps(record))

    async def write(self) -> None:
        raw, keys, app = self.raw, self.keys, self.app
        await raw.hset(keys.schema, "store", "3")
        ready, leased = keys.ready(app, "loan"), keys.leased(app, "loan")
        # p: two pending messages, never claimed (no instance hash); q: one, claimed once and released.
        await self.message("p", "m1")
        await self.message("q", "m2")
        await raw.hset(keys.instance(self.member("q")), "tok", "1")
        # d: two done messages, the first sent with an idempotency key and with a recorded step; idle.
        await self.message("d", "m3", "done", v="1")
        await raw.hset(keys.idempotency(self.member("d")), "k-3", "m3")
        await raw.hset(keys.steps(self.member("d"), "m3"), "s", "1")
        await self.message("p", "m4")
        await self.message("d", "m5", "done", v="2")
        member = self.member("d")
        await raw.hset(keys.instance(member), mapping={"tok": "2", "v": "2", "d": "{}", "t": "1", "w": "old:1"})
        await self.turn("d", "m3", 1)
        await self.turn("d", "m5", 2)
        # x: paused by its failed first message, a later one waiting.
        await self.message("x", "m6", "failed", e="boom", f=str(STARTED_US))
        await self.message("x", "m7")
        await raw.hset(keys.instance(self.member("x")), mapping={"tok": "1", "paused": "1"})
        await raw.zadd(keys.dead(app), {"m6": STARTED_US})
        await self.turn("x", "m6", 1, "failed")
        # l: leased under an expired lease.
        await self.message("l", "m8")
        expired = str(STARTED_US)
        await raw.hset(keys.instance(self.member("l")), mapping={"tok": "3", "own": "old:1", "exp": expired})
        await raw.zadd(leased, {self.member("l"): STARTED_US})
        for workflow_id, ids in (("p", ["m1", "m4"]), ("q", ["m2"]), ("x", ["m6", "m7"]), ("l", ["m8"])):
            await raw.rpush(keys.inbox(self.member(workflow_id)), *ids)
        await raw.zadd(ready, {self.member("p"): 1, self.member("q"): 2})
        # bulk: many done messages of one more instance.
        for n in range(BULK):
            await self.message("bulk", f"b{n}", "done", v=str(n + 1))
        await raw.set(keys.sequence(app), str(self.seq))


@pytest.mark.parametrize(("prefix", "app"), [("keel:", "loans"), ("we*rd[1]?:", "lo{a}n%s/x")])
async def test_the_schema_step_dates_and_indexes_a_layout_3_database(
    redis_url: str,
    raw: Redis,
    prefix: str,
    app: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(migrate, "SCAN_COUNT", 7)  # several HSCAN batches, so several upgrade scripts
    calls: list[str] = []
    register = migrate._runtime_script

    def counting(client: Redis, name: str) -> Any:
        script = register(client, name)

        async def call(**arguments: Any) -> Any:
            calls.append(name)
            return await script(**arguments)

        return call

    monkeypatch.setattr(migrate, "_runtime_script", counting)
    keys = RedisKeys(prefix)
    old = Layout3(raw, keys, app)
    await old.write()
    await raw.hset("keel-unrelated:msgindex:{loans}", "m1", "loans/loan/p")
    url = prefixed_url(redis_url, prefix)
    before_us = micros(await server_now(raw))
    with caplog.at_level(logging.INFO, logger=MIGRATE_LOGGER):
        opened = await open_backend(url, StoreOptions())
    after_us = micros(await server_now(raw))
    try:
        assert await raw.hget(keys.schema, "store") == str(STORE_SCHEMA_VERSION) == "7"
        assert any(f"{8 + BULK} message(s) upgraded for schema 4" in r.getMessage() for r in caplog.records)
        assert calls.count("upgrade_4.lua") > 10 and "upgrade_3.lua" not in calls
        member = old.member

        # Every message is dated by the upgrade, a microsecond apart in send order.
        visible: dict[str, int] = {}
        for message_id, seq in old.seqs.items():
            workflow_id = "bulk" if message_id.startswith("b") else _owner(message_id)
            fields = await raw.hgetall(keys.message(member(workflow_id), message_id))
            assert fields["a"] == fields["r"]
            visible[message_id] = int(fields["r"])
            assert visible[message_id] == visible["m1"] + seq - 1
        upgrade_us = visible["m1"] + old.seq - 1
        assert before_us <= upgrade_us <= after_us

        # Inboxes are sorted sets by visible time; ready instances are rescored by their next message.
        def entry(message_id: str) -> tuple[str, float]:
            return f"{old.seqs[message_id]:016d}:{message_id}", float(visible[message_id])

        assert await raw.zrange(keys.inbox(member("p")), 0, -1, withscores=True) == [entry("m1"), entry("m4")]
        assert await raw.zrange(keys.inbox(member("x")), 0, -1, withscores=True) == [entry("m6"), entry("m7")]
        assert await raw.zrange(keys.ready(app, "loan"), 0, -1, withscores=True) == [
            (member("p"), visible["m1"]),
            (member("q"), visible["m2"]),
        ]
        # The indexes of prune and delete, and a token on every instance.
        assert await raw.smembers(keys.ids(member("p"))) == {"m1", "m4"}
        assert await raw.smembers(keys.ids(member("d"))) == {"m3", "m5"}
        assert await raw.hget(keys.message(member("d"), "m3"), "k") == "k-3"
        assert await raw.zrange(keys.finished_keyed(app), 0, -1, withscores=True) == [("m3", visible["m3"])]
        finished = dict(cast("list[tuple[str, float]]", await raw.zrange(keys.finished(app), 0, -1, withscores=True)))
        assert len(finished) == BULK + 1 and set(finished.values()) == {float(upgrade_us)}
        assert await raw.zrange(keys.turn_index(app), 0, -1, withscores=True) == [
            (member("d"), STARTED_US + 1_000_000),
            (member("x"), STARTED_US + 1_000_000),
        ]
        assert await raw.hget(keys.instance(member("p")), "tok") == "0"
        assert await raw.hget(keys.instance(member("q")), "tok") == "1"

        upgraded = await snapshot(raw)
        await upgrade_layout(raw, keys, 3, url=url)  # idempotent: a second run, as a racing process's, changes nothing
        await upgrade_layout(raw, keys, 2, url=url)  # nor does a run from layout 2, cut short after its first step
        assert await snapshot(raw) == upgraded
        assert not await raw.exists("keel-unrelated:ids:{loans/loan/p}")

        # The upgraded data runs on: claims in send order, the expired lease swept back by its message's time.
        claims = await opened.claim(app, ["loan"], worker="w1", lease_s=5, limit=10)
        assert [(c.instance.workflow_id, c.message_id, c.fencing_token) for c in claims] == [
            ("p", "m1", 1),
            ("q", "m2", 2),
            ("l", "m8", 4),
        ]
        await opened.commit_turn(TurnCommit(claims[0], "{}", "w1", datetime.now(UTC), 0.01))
        assert await opened.resolve_dead_letter(old.ref("x"), skip=True) == "m6"
        later = datetime.now(UTC) + timedelta(seconds=5)
        pruned = await opened.prune(app, finished_before=later, keys_before=later)
        assert (pruned.messages, pruned.turns) == (BULK + 4, 4)  # m1, m3, m5, m6 and the bulk; every turn
        assert await opened.message(app, "m3") is None
        assert await opened.send(NewMessage(old.ref("d"), "m9", "{}", "k-3")) == "m9"  # the key was pruned with m3
        assert await opened.delete_instance(old.ref("p")) is True
        assert await opened.message(app, "m4") is None
        assert [c.message_id for c in await opened.claim(app, ["loan"], worker="w1", lease_s=5, limit=10)] == [
            "m7",
            "m9",
        ]
    finally:
        await opened.aclose()
    before = await snapshot(raw)
    await reopen(url)  # at schema 4 already: no upgrade runs
    assert await snapshot(raw) == before


def _owner(message_id: str) -> str:
    return {"m1": "p", "m2": "q", "m3": "d", "m4": "p", "m5": "d", "m6": "x", "m7": "x", "m8": "l"}[message_id]

"""Redis-only behaviour of waits for ends: the scripts PUBLISH on the channel the subscriber listens to, all waits of a
backend share one pub/sub connection, and a killed connection loses no end. What every engine shares is in
tests/conformance/test_wait_for_end.py."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from keel.backends.base import MessageStatus
from keel.backends.redis.keys import RedisKeys
from tests._engine import APP, claim_one, commit_of, failure_of, ref, send

if TYPE_CHECKING:
    from keel.backends.base import MessageInfo
    from keel.backends.redis.backend import RedisBackend

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def no_safety_rereads(backend: RedisBackend) -> None:
    """Only a PUBLISH, or a re-read after a (re)SUBSCRIBE, may end these waits early."""
    backend.broker.ends.recheck_s = 300.0


async def parked(backend: RedisBackend, message_id: str) -> asyncio.Task[MessageInfo | None]:
    """A wait for ``message_id``, parked once the subscriber has subscribed to the app's channel."""
    waiting = asyncio.create_task(backend.wait_for_end(APP, message_id, timeout_s=30))
    subscriber = backend.broker._end_subscriber
    deadline = time.monotonic() + 5
    while RedisKeys().ended(APP) not in subscriber._subscribed:
        assert time.monotonic() < deadline, "the subscriber never subscribed"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not waiting.done()
    return waiting


def subscriber_address(backend: RedisBackend) -> str:
    pubsub = backend.broker._end_subscriber._pubsub
    assert pubsub is not None and pubsub.connection is not None
    host, port = pubsub.connection._writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def test_the_ending_scripts_publish_the_message_id_on_the_apps_channel(
    backend: RedisBackend, other: RedisBackend, redis_url: str
) -> None:
    raw = Redis.from_url(redis_url, decode_responses=True)
    listening = raw.pubsub()
    await listening.subscribe(RedisKeys().ended(APP))
    try:
        done = await send(other, ref("a"))
        await other.commit_turn(commit_of(await claim_one(other)))
        failed = await send(other, ref("b"))
        await other.fail_turn(failure_of(await claim_one(other)))
        assert await other.resolve_dead_letter(ref("b"), skip=True) == failed
        heard: list[str] = []
        deadline = time.monotonic() + 5
        while len(heard) < 3 and time.monotonic() < deadline:
            message = await listening.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                heard.append(message["data"])
        assert heard == [done, failed, failed]  # committed; dead-lettered; skipped
    finally:
        await listening.aclose()
        await raw.aclose()


async def test_many_waits_share_one_pubsub_connection(backend: RedisBackend, other: RedisBackend) -> None:
    sent = [await send(other, ref(f"i{n}")) for n in range(100)]
    waits = [asyncio.create_task(backend.wait_for_end(APP, message_id, timeout_s=30)) for message_id in sent]
    last = await parked(backend, await send(other, ref("last")))
    clients = await backend.store.connection.client.client_list(_type="pubsub")
    address = subscriber_address(backend)
    assert [c["addr"] for c in clients if c["addr"] == address] == [address]
    assert int(next(c for c in clients if c["addr"] == address)["sub"]) == 1  # one channel: the app's
    claims = await other.claim(APP, ["loan"], worker="w1", lease_s=30, limit=200)
    await asyncio.gather(*(other.commit_turn(commit_of(claim)) for claim in claims))
    infos = await asyncio.wait_for(asyncio.gather(*waits, last), 10)
    assert {info.status for info in infos if info is not None} == {MessageStatus.done}


async def test_a_killed_pubsub_connection_loses_no_end(
    backend: RedisBackend, other: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = await send(other, ref())
    waiting = await parked(backend, message_id)
    subscriber = backend.broker._end_subscriber
    # Hold the new subscription until the end has been committed, so that its PUBLISH certainly reaches no one.
    committed = asyncio.Event()
    serve = subscriber._serve_slice

    async def resubscribe_after_the_commit() -> None:
        if subscriber._pubsub is None:
            await committed.wait()
        await serve()

    monkeypatch.setattr(subscriber, "_serve_slice", resubscribe_after_the_commit)
    address = subscriber_address(backend)
    assert await backend.store.connection.client.client_kill_filter(_type="pubsub", addr=address) == 1
    deadline = time.monotonic() + 5
    while subscriber._pubsub is not None:  # the pump noticed
        assert time.monotonic() < deadline, "the pump never noticed its connection was killed"
        await asyncio.sleep(0.01)
    await other.commit_turn(commit_of(await claim_one(other)))
    committed.set()
    ended_at = time.monotonic()
    info = await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - ended_at < 2.0  # the re-read after the new SUBSCRIBE, not the 300 s safety re-read
    assert info is not None and info.status is MessageStatus.done

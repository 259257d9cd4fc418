"""Upgrades of the Redis layout in place, run at connect before the raised schema version is recorded.

From 2 to 3 (``scripts/upgrade_3.lua``): every failed message gets its failure time and joins its app's dead
set, which ``dead_letters`` reads. The instances are found with ``SCAN`` over ``inst:`` keys.

From 3 to 4 (``scripts/upgrade_4.lua``): every message gets a send and visible time (layout 3 kept none: the
upgrade's time, minus a microsecond per later message of the app, which keeps the send order), its
idempotency key and its place in the instance's ``ids:`` set; a done or skipped message is dated by the
upgrade and indexed in ``finished:`` or ``finkeyed:``; each inbox list becomes a sorted set by visible time,
a ready instance is rescored by its next message's visible time, every instance gets a token and is indexed
by its oldest turn record in ``turnidx:``. The apps are found with ``SCAN`` over ``msgindex:`` keys, and their
messages with ``HSCAN`` of each.

From 4 to 5 nothing is rewritten: the event log's keys and the handler deliveries' instances are created on
first use, so only the version is recorded.

From 5 to 6 (``scripts/upgrade_6.lua``): every instance's hash gets its ``kind``, which sends set from then on and
prune goes by. The deliveries stored so far are exactly the instances of the pseudo-workflows ``on/HANDLER`` (user
workflow names cannot contain ``/``): this upgrade is the one place that reads the name (``keel.records.handler_of``),
once. The instances are found with ``SCAN`` over ``inst:`` keys.

From 6 to 7 nothing is rewritten: the ready sets were per workflow already (version 7 is the one at which the SQL
engines index their ready instances by workflow), so only the version is recorded.

All work batch by batch, one script per batch, so the server is never blocked for long; the scripts are
idempotent, so processes connecting together may both run them, and one cut short is finished by the next
connect (the version stays where it was until an upgrade completed). Processes of an older keel must be
stopped first: they cannot read the new layout.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from keel.backends.base import InstanceKind
from keel.backends.redis.keys import parse_instance_member
from keel.backends.redis.lua import runtime_script
from keel.records import handler_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from redis.asyncio import Redis

    from keel.backends.redis.keys import RedisKeys

logger = logging.getLogger(__name__)

#: The layout version this code reads and writes, kept in the schema hash under ``SCHEMA_COMPONENT``:
#: 1 the versioned store, 2 adds the runtime's keys (created on first use, so 1 -> 2 only records the number),
#: 3 adds step results, retry holds and dead letters (2 -> 3 indexes the failed messages: ``migrate.py``),
#: 4 adds timers, pruning and deletion (3 -> 4 dates the messages and builds the new indexes: ``migrate.py``),
#: 5 adds the event log and handler deliveries (keys created on first use, so 4 -> 5 only records the number),
#: 6 stores each instance's kind (5 -> 6 writes it into every instance's hash: ``migrate.py``), 7 is the version at
#: which SQLite and PostgreSQL index their ready instances by workflow (Redis always kept a ready set per workflow,
#: so 6 -> 7 only records the number, keeping the engines' versions in step).
STORE_SCHEMA_VERSION = 7

#: The field of the schema hash that holds the store's layout version.
SCHEMA_COMPONENT = "store"

#: Keys asked of each ``SCAN`` or ``HSCAN`` call, and so about the instances or messages one script handles.
SCAN_COUNT = 500

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


async def upgrade_layout(client: Redis, keys: RedisKeys, found: int, *, url: str) -> None:
    """Bring data at layout ``found`` up to the current one; a no-op for data that is current already."""
    if found == 2:
        indexed = await _index_dead_letters(client, keys)
        logger.info("keel data at %s (prefix %r): %d dead letter(s) indexed for schema 3", url, keys.prefix, indexed)
    if found in (2, 3):
        upgraded = await _date_and_index_messages(client, keys)
        logger.info("keel data at %s (prefix %r): %d message(s) upgraded for schema 4", url, keys.prefix, upgraded)
    if 2 <= found <= 5:
        kinds = await _store_instance_kinds(client, keys)
        logger.info("keel data at %s (prefix %r): %d instance(s) given a kind for schema 6", url, keys.prefix, kinds)


def _runtime_script(client: Redis, name: str) -> Any:
    return client.register_script(runtime_script(name))


async def _scan(client: Redis, start: str) -> AsyncIterator[list[str]]:
    """Every key name starting with ``start`` and ending in ``}`` (one per instance or app), ``SCAN`` batch by batch."""
    pattern = _GLOB_SPECIAL.sub(r"\\\1", start) + "*"
    cursor = 0
    while True:
        reply: Any = await client.scan(cursor, match=pattern, count=SCAN_COUNT)
        cursor = int(reply[0])
        yield [str(name) for name in reply[1] if str(name).endswith("}")]
        if cursor == 0:
            return


async def _index_dead_letters(client: Redis, keys: RedisKeys) -> int:
    """Run ``upgrade_3.lua`` over every instance, one ``SCAN`` batch per call; return the letters it indexed."""
    script = _runtime_script(client, "upgrade_3.lua")
    start = f"{keys.prefix}inst:{{"
    indexed = 0
    async for names in _scan(client, start):
        batch_keys: list[str] = []
        members: list[str] = []
        for name in names:
            member = name[len(start) : -1]
            app = parse_instance_member(member)[0]
            batch_keys += [keys.instance(member), keys.inbox(member), keys.turns(member), keys.dead(app)]
            members.append(member)
        if members:
            indexed += int(await script(keys=batch_keys, args=[keys.prefix, *members]))
    return indexed


async def _date_and_index_messages(client: Redis, keys: RedisKeys) -> int:
    """Run ``upgrade_4.lua`` over every message of every app, one ``HSCAN`` batch per call; return the count."""
    script = _runtime_script(client, "upgrade_4.lua")
    seconds, micros = await client.time()
    upgrade_us = seconds * 1_000_000 + micros
    start = f"{keys.prefix}msgindex:{{"
    upgraded = 0
    apps = [name async for names in _scan(client, start) for name in names]  # one key per app: few
    for name in apps:
        app = unquote(name[len(start) : -1])
        if keys.message_index(app) != name:
            continue  # not a message index of this layout
        app_seq = int(await client.get(keys.sequence(app)) or 0)
        app_keys = [keys.finished(app), keys.finished_keyed(app), keys.turn_index(app)]
        cursor = 0
        while True:
            reply: Any = await client.hscan(name, cursor, count=SCAN_COUNT)
            cursor, pairs = int(reply[0]), dict(reply[1])
            batch_keys, args = list(app_keys), [keys.prefix, upgrade_us, app_seq]
            for message_id, member in pairs.items():
                workflow = parse_instance_member(member)[1]
                batch_keys += [
                    keys.instance(member),
                    keys.inbox(member),
                    keys.ids(member),
                    keys.idempotency(member),
                    keys.turns(member),
                    keys.message(member, message_id),
                    keys.ready(app, workflow),
                ]
                args += [member, message_id]
            if pairs:
                upgraded += int(await script(keys=batch_keys, args=args))
            if cursor == 0:
                break
    return upgraded


async def _store_instance_kinds(client: Redis, keys: RedisKeys) -> int:
    """Run ``upgrade_6.lua`` over every instance, one ``SCAN`` batch per call; return how many it gave a kind."""
    script = _runtime_script(client, "upgrade_6.lua")
    start = f"{keys.prefix}inst:{{"
    given = 0
    async for names in _scan(client, start):
        members = [name[len(start) : -1] for name in names]
        instances = [keys.instance(member) for member in members]
        kinds = [_kind_from_name(member) for member in members]
        if members:
            given += int(await script(keys=instances, args=kinds))
    return given


def _kind_from_name(member: str) -> str:
    """What an instance stored before layout 6 holds: deliveries were exactly the instances of ``on/HANDLER``."""
    workflow = parse_instance_member(member)[1]
    return (InstanceKind.workflow if handler_of(workflow) is None else InstanceKind.delivery).value

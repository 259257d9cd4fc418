"""Upgrades of the Redis layout in place, run at connect before the raised schema version is recorded.

From 2 to 3 (``scripts/upgrade_3.lua``): every failed message gets its failure time and joins its app's dead
set, which ``dead_letters`` reads. The instances are found with ``SCAN`` over ``inst:`` keys and upgraded
batch by batch, one script per batch, so the server is never blocked for long; the script is idempotent, so
processes connecting together may both run it, and one cut short is finished by the next connect (the
version stays at 2 until an upgrade completed). Every other change of layout 3 (step hashes, holds) is
created on first use and needs nothing.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from keel.backends.redis.keys import parse_instance_member

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from keel.backends.redis.keys import RedisKeys

logger = logging.getLogger(__name__)

#: Keys asked of each ``SCAN`` call, and so about the instances one upgrade script handles at most.
SCAN_COUNT = 500

_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


async def upgrade_layout(client: Redis, keys: RedisKeys, found: int, *, url: str) -> None:
    """Bring data at layout ``found`` up to the current one; a no-op for data that is current already."""
    if found == 2:
        indexed = await _index_dead_letters(client, keys)
        logger.info("keel data at %s (prefix %r): %d dead letter(s) indexed for schema 3", url, keys.prefix, indexed)


async def _index_dead_letters(client: Redis, keys: RedisKeys) -> int:
    """Run ``upgrade_3.lua`` over every instance, one ``SCAN`` batch per call; return the letters it indexed."""
    # Imported here: store.py, which calls this module, defines it.
    from keel.backends.redis.broker import runtime_script

    script = client.register_script(runtime_script("upgrade_3.lua"))
    start = f"{keys.prefix}inst:{{"
    pattern = _GLOB_SPECIAL.sub(r"\\\1", start) + "*"
    indexed, cursor = 0, 0
    while True:
        reply: Any = await client.scan(cursor, match=pattern, count=SCAN_COUNT)
        cursor, names = int(reply[0]), [str(name) for name in reply[1]]
        batch_keys: list[str] = []
        members: list[str] = []
        for name in names:
            if not name.endswith("}"):
                continue  # not an instance hash of this layout
            member = name[len(start) : -1]
            app = parse_instance_member(member)[0]
            batch_keys += [keys.instance(member), keys.inbox(member), keys.turns(member), keys.dead(app)]
            members.append(member)
        if members:
            indexed += int(await script(keys=batch_keys, args=[keys.prefix, *members]))
        if cursor == 0:
            return indexed

"""Pruning an app's finished records and deleting an instance, as ``scripts/prune.lua`` and ``delete.lua`` do them.

Prune reads five per-app indexes, so it never scans the keyspace: ``finished:`` (done and skipped messages
without an idempotency key, by finish time), ``finkeyed:`` (those with a key, by send time), ``turnidx:``
(instances by the start of their oldest kept turn record), and ``evtime:`` and ``evkeyed:`` (events without and
with an idempotency key, by publish time; one mode reads both). Each script call handles at most ``PRUNE_BATCH``
entries, so the server is never blocked for long; ``prune_app`` calls it again until a call finds no more, so one
``prune`` removes everything due (work done concurrently may leave a little for the next one). Each call is
atomic: a message goes with its step results, index entries and idempotency entry, or not at all, and a handler
delivery's message with its instance, whole; an event goes with its index entries and idempotency entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keel.backends.base import InstanceKind, Pruned
from keel.backends.redis.keys import instance_member

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from keel.backends.base import InstanceRef
    from keel.backends.redis.keys import RedisKeys

#: Set entries one prune script reads at most (messages, or instances and turn records).
PRUNE_BATCH = 500

_MODES = ("finished", "keyed", "turns", "events")


async def prune_app(
    script: AsyncScript, keys: RedisKeys, app: str, *, finished_before_us: int, keys_before_us: int
) -> Pruned:
    """Run ``prune.lua`` batch after batch, in each of its modes, until nothing due is left; return the counts."""
    index_keys = [keys.finished(app), keys.finished_keyed(app), keys.turn_index(app), keys.message_index(app)]
    index_keys += [keys.events(app), keys.event_times(app), keys.event_times_keyed(app), keys.event_keys(app)]
    counts = dict.fromkeys(_MODES, 0)
    for mode in _MODES:
        offset = 0
        while True:
            args: list[str | int] = [keys.prefix, mode, finished_before_us, keys_before_us, PRUNE_BATCH, offset]
            args += [keys.event_stem(app), InstanceKind.delivery.value]
            deleted, more, kept = (int(n) for n in await script(keys=index_keys, args=args))
            counts[mode] += deleted
            offset += kept
            if not more:
                break
    return Pruned(messages=counts["finished"] + counts["keyed"], turns=counts["turns"], events=counts["events"])


def delete_call(keys: RedisKeys, instance: InstanceRef) -> tuple[list[str], list[str]]:
    """The keys and arguments of ``delete.lua`` for one instance."""
    member, app = instance_member(instance), instance.app
    names = [
        keys.instance(member),
        keys.inbox(member),
        keys.ids(member),
        keys.idempotency(member),
        keys.states(member),
        keys.turns(member),
        keys.ready(app, instance.workflow),
        keys.leased(app, instance.workflow),
        keys.dead(app),
        keys.finished(app),
        keys.finished_keyed(app),
        keys.turn_index(app),
        keys.message_index(app),
        keys.token_floor(app),
    ]
    return names, [keys.prefix, member]

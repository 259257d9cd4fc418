"""What the appending scripts are given: send units, event units, and the outbox of a turn's commit.

A send unit is the ten keys and six arguments of ``scripts/send.lua`` (its ``wake_maxlen`` aside); ``send``
passes one, a commit one per message its turn sends, and an event one per delivery. An event unit is the keys and
arguments of ``scripts/publish.lua`` (its ``wake_maxlen`` aside): the event's six keys and five arguments, the
fields of its hash, then one send unit per delivery. ``runtime_lib.lua`` runs them with ``send_message`` and
``publish_event``, so a send means the same thing whichever script makes it.

The event hash's fields (``keys.py``): ``q`` sequence number, ``a`` published at (both written by the script),
``y`` type, ``p`` payload JSON, ``h`` handlers as a JSON array, ``sa`` ``sw`` ``si`` the source instance, ``m``
the source message id, ``k`` the idempotency key; those that are None are left out.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from keel.backends.base import EventRow, InstanceRef
from keel.backends.redis.keys import instance_member
from keel.backends.redis.rows import from_micros, micros

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keel.backends.base import NewEvent, NewMessage
    from keel.backends.redis.keys import RedisKeys

#: The keys and arguments of one unit, or of several laid end to end.
Unit = tuple[list[str], list[str | int]]


def send_unit(keys: RedisKeys, message: NewMessage) -> Unit:
    """The unit that sends ``message``, visible ``delay_s`` after the script's now."""
    ref, member = message.instance, instance_member(message.instance)
    names = [
        keys.instance(member),
        keys.inbox(member),
        keys.message(member, message.message_id),
        keys.idempotency(member),
        keys.ids(member),
        keys.sequence(ref.app),
        keys.message_index(ref.app),
        keys.ready(ref.app, ref.workflow),
        keys.token_floor(ref.app),
        keys.wake(ref.app),
    ]
    key = message.idempotency_key
    args: list[str | int] = [member, message.message_id, message.payload_json, *_optional(key)]
    return names, [*args, micros(max(0.0, message.delay_s)), message.kind.value]


def event_unit(keys: RedisKeys, event: NewEvent) -> Unit:
    """The unit that appends ``event`` to its app's log and sends its deliveries."""
    app = event.app
    names = [
        keys.event(app, event.event_id),
        keys.events(app),
        keys.event_times(app),
        keys.event_times_keyed(app),
        keys.event_keys(app),
        keys.sequence(app),
    ]
    fields = _event_fields(event)
    args: list[str | int] = [event.event_id, *_optional(event.idempotency_key), len(event.deliveries)]
    args += [len(fields) // 2, *fields]
    for delivery in event.deliveries:
        more_names, more_args = send_unit(keys, delivery)
        names += more_names
        args += more_args
    return names, args


def outbox(keys: RedisKeys, sends: Sequence[NewMessage], events: Sequence[NewEvent]) -> Unit:
    """The send units of ``sends``, then the event units of ``events``, as ``group.lua``'s commits take them."""
    names: list[str] = []
    args: list[str | int] = []
    for unit_names, unit_args in [*(send_unit(keys, m) for m in sends), *(event_unit(keys, e) for e in events)]:
        names += unit_names
        args += unit_args
    return names, args


def event_from_row(app: str, row: list[Any]) -> EventRow:
    """One event of ``events.lua``'s reply: its id and its hash's fields and values."""
    event_id, flat = row
    pairs = iter(flat)
    fields: dict[str, str] = dict(zip(pairs, pairs, strict=True))
    source = InstanceRef(fields["sa"], fields["sw"], fields["si"]) if "sa" in fields else None
    return EventRow(
        app,
        int(fields["q"]),
        event_id,
        fields["y"],
        fields["p"],
        tuple(json.loads(fields["h"])),
        source,
        fields.get("m"),
        fields.get("k"),
        from_micros(fields["a"]),
    )


def _optional(value: str | None) -> list[str]:
    # A flag and the value: a script cannot tell an empty string from a missing one otherwise.
    return ["0", ""] if value is None else ["1", value]


def _event_fields(event: NewEvent) -> list[str]:
    fields = ["y", event.type, "p", event.payload_json, "h", json.dumps(list(event.handlers))]
    if event.source is not None:
        fields += ["sa", event.source.app, "sw", event.source.workflow, "si", event.source.workflow_id]
    if event.source_message_id is not None:
        fields += ["m", event.source_message_id]
    return fields

"""Every Redis key name the engine uses, built here and nowhere else.

Layout, with the default prefix ``keel:`` (``?prefix=NAME`` in the URL picks another)::

    keel:schema        hash  component -> schema version ("store" -> "3"), written at connect
    keel:kv:{TAG}      hash  the current record of one store key: v version, d value JSON (absent in a
                             tombstone), t written_at in microseconds since the epoch, w writer
    keel:kvh:{TAG}     list  the kept versions of that key, newest first, as JSON entries

``TAG`` is the store key with ``%``, ``{`` and ``}`` percent-encoded. Redis Cluster hashes only what lies
between the first ``{`` and the next ``}``, so with no brace left inside, the tag cannot end early or
start late: both keys of one store key always share a slot, and a Lua script may touch them together.
The encoding is reversible, so two store keys never share a tag.

The runtime (schema version 2; version 3 adds ``steps:``, ``dead:``, holds, ``lapsed`` and ``f``; version 4 adds
timers, pruning and deletion: the inbox becomes a sorted set by visible time, messages get ``a``, ``r``, ``x`` and
``k``, and ``ids:``, ``finished:``, ``finkeyed:``, ``turnidx:`` and ``tokfloor:`` appear; version 5 adds the event
log: ``event:``, ``events:``, ``evtime:``, ``evkeyed:`` and ``evidem:``) adds, per workflow
instance, under the tag ``{INST}`` where ``INST`` is ``app/workflow/workflow_id`` with each part percent-encoded
(``%``, ``/``, ``{``, ``}``) so that it splits back into the same three parts::

    keel:inst:{INST}           hash  tok fencing token (created by the first send); own, exp lease owner and
                                     expiry (microseconds, absent when not leased; exp without own: a hold
                                     after a retry); lapsed the expiry of a swept lease; paused "1"; v, d, t, w
                                     the committed state. It exists exactly while the instance does
    keel:inbox:{INST}          zset  "SEQ:ID" -> visible time, for each pending message (SEQ its sequence
                                     number, zero-padded to 16 digits): the lowest is the next turn's
    keel:msg:{INST}:ID         hash  one message: p payload JSON, s status, n attempts, q sequence number,
                                     a sent and r visible at, k idempotency key, v state version its turn
                                     committed, e error and f time of its failure, x time it finished
    keel:steps:{INST}:ID       hash  step name -> result JSON recorded for message ID, first result kept
    keel:ids:{INST}            set   the id of every kept message of the instance, whatever its status
    keel:idem:{INST}           hash  idempotency key -> the id of the first message sent under it
    keel:states:{INST}         list  the last STATE_HISTORY_LIMIT states, newest first, as in kvh:
    keel:turns:{INST}          list  the last TURNS_LIMIT turn records, newest first, as JSON

and per app, under the tag ``{APP}`` (the app name encoded like a store key)::

    keel:seq:{APP}             string  the app's sequence counter: the order of its sends and events
    keel:msgindex:{APP}        hash    message id -> INST, so a message is found from its app and id alone
    keel:ready:{APP}:WORKFLOW  zset    INST -> visible time of its next message, for every instance with a
                                       pending message that is neither leased, held nor paused
    keel:leased:{APP}:WORKFLOW zset    INST -> lease expiry in microseconds, for every leased or held instance
    keel:dead:{APP}            zset    message id -> failure time in microseconds, for every failed message
    keel:finished:{APP}        zset    message id -> finish time, for done and skipped messages without a key
    keel:finkeyed:{APP}        zset    message id -> send time, for done and skipped messages with a key
    keel:turnidx:{APP}         zset    INST -> start of its oldest kept turn record
    keel:tokfloor:{APP}        string  the highest fencing token of any deleted instance of the app
    keel:wake:{APP}            stream  one entry per send or resolved dead letter (capped), read with XREAD
                                       BLOCK by idle workers
    keel:ended:{APP}           channel not a key: a pub/sub channel, published to with the message id by the
                                       commit, dead letter or skip that ends a message; clients waiting for ends
                                       subscribe to it
    keel:event:{APP}:ID        hash    one event of the app's log: q its sequence number (from seq:), y type,
                                       p payload JSON, h handlers as a JSON array, a published at, and when
                                       given: sa sw si the source instance's app, workflow and id, m the
                                       source message id, k the idempotency key
    keel:events:{APP}          zset    event id -> q, for every event in the log: ``events()`` reads it
                                       newest first
    keel:evtime:{APP}          zset    event id -> a, for every event without an idempotency key (prune)
    keel:evkeyed:{APP}         zset    event id -> a, for every event with one (prune)
    keel:evidem:{APP}          hash    idempotency key -> the id of the event first published under it

A handler delivery is an ordinary instance ``APP/on%2FHANDLER/EVENT_ID`` (workflow ``on/HANDLER``) with one
message; prune deletes it whole, keeping no token in ``tokfloor:``, once that message is pruned.

The claim, commit, release, dead-letter, resolve, prune, delete and upgrade scripts build the ``inst:``,
``inbox:``, ``msg:``, ``steps:``, ``ids:``, ``idem:`` and ``turns:`` names of instances and messages they find
themselves, from the prefix they are given, exactly as ``RedisKeys`` does here; the events and prune scripts
build ``event:`` names from ``event_stem``.

Every key of one instance shares that instance's slot, and every per-app key the app's slot. Each runtime
script touches one instance's keys plus its app's keys, except claim, prune and the upgrades, which reach
instances of many slots in one script and build their key names themselves, and a commit or publish that
sends to other instances (given their keys). That is sound on a single primary, which is all keel supports
now; Redis Cluster will need per-slot ready queues (ready and leased sets per slot, claimed slot by slot, with
the instance's tag in every key a script touches) and sends across slots moved out of the commit (an outbox
drained slot by slot) before the runtime can run there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from keel.errors import ConfigurationError

if TYPE_CHECKING:
    from keel.backends.base import InstanceRef

#: The prefix of every key when the URL names none.
DEFAULT_PREFIX = "keel:"

#: The URL query parameter that picks the prefix; keel's own, removed before redis-py sees the URL.
PREFIX_PARAM = "prefix"

# "%" first: it is the escape character, so it must be encoded before the escapes are written.
_TAG_ESCAPES = (("%", "%25"), ("{", "%7B"), ("}", "%7D"))

# An instance's parts are joined with "/", so a "/" inside a part is encoded too.
_PART_ESCAPES = (*_TAG_ESCAPES, ("/", "%2F"))


def hash_tag(key: str) -> str:
    """Return ``key`` as a cluster hash tag, braces included: ``a{b`` -> ``{a%7Bb}``."""
    for char, escaped in _TAG_ESCAPES:
        key = key.replace(char, escaped)
    return "{" + key + "}"


def instance_member(ref: InstanceRef) -> str:
    """Return the name of an instance inside its tag and in the ready sets: ``app/workflow/workflow_id``, encoded."""
    return "/".join(_encode_part(part) for part in (ref.app, ref.workflow, ref.workflow_id))


def parse_instance_member(member: str) -> tuple[str, str, str]:
    """Split an ``instance_member`` back into app, workflow and workflow id."""
    app, workflow, workflow_id = (unquote(part) for part in member.split("/"))
    return app, workflow, workflow_id


def _encode_part(part: str) -> str:
    for char, escaped in _PART_ESCAPES:
        part = part.replace(char, escaped)
    return part


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The key names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def schema(self) -> str:
        """The hash of schema versions, one field per component."""
        return f"{self.prefix}schema"

    def current(self, key: str) -> str:
        """The hash holding the current record of ``key``."""
        return f"{self.prefix}kv:{hash_tag(key)}"

    def history(self, key: str) -> str:
        """The list holding the kept versions of ``key``, newest first."""
        return f"{self.prefix}kvh:{hash_tag(key)}"

    def instance(self, member: str) -> str:
        """The hash of one instance: fencing token, lease, paused flag and committed state."""
        return f"{self.prefix}inst:{{{member}}}"

    def inbox(self, member: str) -> str:
        """The sorted set of an instance's pending messages, by visible time, then sequence number."""
        return f"{self.prefix}inbox:{{{member}}}"

    def message(self, member: str, message_id: str) -> str:
        """The hash of one message, under its instance's tag."""
        return f"{self.prefix}msg:{{{member}}}:{message_id}"

    def steps(self, member: str, message_id: str) -> str:
        """The hash of step name -> result JSON recorded for one message, under its instance's tag."""
        return f"{self.prefix}steps:{{{member}}}:{message_id}"

    def ids(self, member: str) -> str:
        """The set of the id of every kept message of an instance."""
        return f"{self.prefix}ids:{{{member}}}"

    def idempotency(self, member: str) -> str:
        """The hash of an instance's idempotency keys -> first message ids."""
        return f"{self.prefix}idem:{{{member}}}"

    def states(self, member: str) -> str:
        """The list of an instance's kept states, newest first."""
        return f"{self.prefix}states:{{{member}}}"

    def turns(self, member: str) -> str:
        """The list of an instance's turn records, newest first."""
        return f"{self.prefix}turns:{{{member}}}"

    def sequence(self, app: str) -> str:
        """The counter that orders every message sent to ``app``."""
        return f"{self.prefix}seq:{hash_tag(app)}"

    def message_index(self, app: str) -> str:
        """The hash of message id -> instance member, for every message sent to ``app``."""
        return f"{self.prefix}msgindex:{hash_tag(app)}"

    def ready(self, app: str, workflow: str) -> str:
        """The sorted set of unleased instances of one workflow, by the visible time of their next message."""
        return f"{self.prefix}ready:{hash_tag(app)}:{workflow}"

    def leased(self, app: str, workflow: str) -> str:
        """The sorted set of leased instances of one workflow, by lease expiry."""
        return f"{self.prefix}leased:{hash_tag(app)}:{workflow}"

    def dead(self, app: str) -> str:
        """The sorted set of ``app``'s failed messages (dead letters), by failure time."""
        return f"{self.prefix}dead:{hash_tag(app)}"

    def finished(self, app: str) -> str:
        """The sorted set of ``app``'s done and skipped messages sent without an idempotency key, by finish time."""
        return f"{self.prefix}finished:{hash_tag(app)}"

    def finished_keyed(self, app: str) -> str:
        """The sorted set of ``app``'s done and skipped messages sent with an idempotency key, by send time."""
        return f"{self.prefix}finkeyed:{hash_tag(app)}"

    def turn_index(self, app: str) -> str:
        """The sorted set of ``app``'s instances by the start of their oldest kept turn record."""
        return f"{self.prefix}turnidx:{hash_tag(app)}"

    def token_floor(self, app: str) -> str:
        """The highest fencing token any deleted instance of ``app`` had: where a new instance's token starts."""
        return f"{self.prefix}tokfloor:{hash_tag(app)}"

    def wake(self, app: str) -> str:
        """The stream that every send to ``app`` appends to, so that idle workers wake."""
        return f"{self.prefix}wake:{hash_tag(app)}"

    def ended(self, app: str) -> str:
        """The pub/sub channel (not a key) that announces the end of each of ``app``'s messages, for waiting clients.

        The scripts name it themselves from a per-app key (``ended_channel`` in ``runtime_lib.lua``), exactly so.
        """
        return f"{self.prefix}ended:{hash_tag(app)}"

    def event(self, app: str, event_id: str) -> str:
        """The hash of one event of ``app``'s log."""
        return f"{self.event_stem(app)}{event_id}"

    def event_stem(self, app: str) -> str:
        """What an event's id is appended to, to name its hash: the scripts that find events build names with it."""
        return f"{self.prefix}event:{hash_tag(app)}:"

    def events(self, app: str) -> str:
        """The sorted set of ``app``'s events by sequence number: the log's order."""
        return f"{self.prefix}events:{hash_tag(app)}"

    def event_times(self, app: str) -> str:
        """The sorted set of ``app``'s events published without an idempotency key, by publish time."""
        return f"{self.prefix}evtime:{hash_tag(app)}"

    def event_times_keyed(self, app: str) -> str:
        """The sorted set of ``app``'s events published with an idempotency key, by publish time."""
        return f"{self.prefix}evkeyed:{hash_tag(app)}"

    def event_keys(self, app: str) -> str:
        """The hash of ``app``'s event idempotency keys -> first event ids."""
        return f"{self.prefix}evidem:{hash_tag(app)}"


def split_prefix(url: str) -> tuple[RedisKeys, str]:
    """Read keel's ``?prefix=`` from ``url``.

    A prefix without a trailing ``:`` gets one, so ``?prefix=myapp`` gives ``myapp:kv:{...}``.

    Returns:
        The key names to use, and the URL without keel's parameter, for redis-py.

    Raises:
        ConfigurationError: The prefix is empty or holds a brace, which would break the hash tags.
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    ours = [value for name, value in pairs if name == PREFIX_PARAM]
    if not ours:
        return RedisKeys(), url
    prefix = _check_prefix(ours[-1])
    rest = urlencode([(name, value) for name, value in pairs if name != PREFIX_PARAM])
    return RedisKeys(prefix), urlunsplit(parts._replace(query=rest))


def _check_prefix(prefix: str) -> str:
    if not prefix or not prefix.isprintable():
        raise ConfigurationError(f"the Redis key prefix must be printable and non-empty, not {prefix!r}")
    if "{" in prefix or "}" in prefix:
        # A brace in the prefix would become the hash tag, putting every key of the store in one slot.
        raise ConfigurationError(f"the Redis key prefix must not contain '{{' or '}}': {prefix!r}")
    return prefix if prefix.endswith(":") else prefix + ":"

"""The Redis key layout: names, hash tags that hold whatever the store key or instance contains, the URL prefix."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

import keel
from keel.backends.base import InstanceRef
from keel.backends.redis.keys import (
    DEFAULT_PREFIX,
    RedisKeys,
    hash_tag,
    instance_member,
    parse_instance_member,
    split_prefix,
)

TRICKY_KEYS = ["plain", "a{b", "a}b", "{}", "}{", "{x}", "%", "%7B", "%257B", "{", "}", "\\{", "a%7Bb", "ü{ß}"]


def test_default_layout() -> None:
    keys = RedisKeys()
    assert keys.prefix == DEFAULT_PREFIX == "keel:"
    assert keys.schema == "keel:schema"
    assert keys.current("loan:42") == "keel:kv:{loan:42}"
    assert keys.history("loan:42") == "keel:kvh:{loan:42}"


def test_braces_and_the_escape_character_are_percent_encoded() -> None:
    assert hash_tag("a{b}c%d") == "{a%7Bb%7Dc%25d}"
    assert RedisKeys().current("{x}") == "keel:kv:{%7Bx%7D}"


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_a_tag_holds_no_brace_but_its_own(key: str) -> None:
    inner = hash_tag(key)[1:-1]
    assert "{" not in inner
    assert "}" not in inner


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_both_keys_of_a_store_key_share_the_slot_of_its_tag(key: str) -> None:
    keys = RedisKeys()
    tag = hash_tag(key)[1:-1].encode()
    current, history = keys.current(key).encode(), keys.history(key).encode()
    assert key_slot(current) == key_slot(history) == key_slot(tag)


def test_distinct_keys_get_distinct_tags() -> None:
    tags = {hash_tag(key) for key in TRICKY_KEYS}
    assert len(tags) == len(TRICKY_KEYS)


def test_url_without_prefix_is_untouched() -> None:
    url = "redis://u:p@127.0.0.1:6379/3?socket_timeout=2"
    assert split_prefix(url) == (RedisKeys(), url)


def test_prefix_is_read_and_stripped_from_the_url() -> None:
    keys, rest = split_prefix("redis://127.0.0.1:6379/3?prefix=myapp&socket_timeout=2")
    assert keys.current("k") == "myapp:kv:{k}"
    assert keys.schema == "myapp:schema"
    assert rest == "redis://127.0.0.1:6379/3?socket_timeout=2"


def test_prefix_ending_in_a_colon_is_kept_as_it_is() -> None:
    keys, rest = split_prefix("redis://127.0.0.1/0?prefix=tenant:7:")
    assert keys.prefix == "tenant:7:"
    assert rest == "redis://127.0.0.1/0"


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "x%0Ay"])
def test_a_prefix_that_would_break_tags_is_refused(prefix: str) -> None:
    with pytest.raises(keel.ConfigurationError, match="prefix"):
        split_prefix(f"redis://127.0.0.1/0?prefix={prefix}")


# -- runtime keys ---------------------------------------------------------------------------------------------------

TRICKY_PARTS = ["plain", "a/b", "a{b}", "%2F", "}{", "/", "ü{ß}/x", "%"]


def test_default_runtime_layout() -> None:
    keys = RedisKeys()
    member = instance_member(InstanceRef("loans", "loan", "42"))
    assert member == "loans/loan/42"
    assert keys.instance(member) == "keel:inst:{loans/loan/42}"
    assert keys.inbox(member) == "keel:inbox:{loans/loan/42}"
    assert keys.message(member, "m1") == "keel:msg:{loans/loan/42}:m1"
    assert keys.steps(member, "m1") == "keel:steps:{loans/loan/42}:m1"
    assert keys.ids(member) == "keel:ids:{loans/loan/42}"
    assert keys.idempotency(member) == "keel:idem:{loans/loan/42}"
    assert keys.states(member) == "keel:states:{loans/loan/42}"
    assert keys.turns(member) == "keel:turns:{loans/loan/42}"
    assert keys.sequence("loans") == "keel:seq:{loans}"
    assert keys.message_index("loans") == "keel:msgindex:{loans}"
    assert keys.ready("loans", "loan") == "keel:ready:{loans}:loan"
    assert keys.leased("loans", "loan") == "keel:leased:{loans}:loan"
    assert keys.dead("loans") == "keel:dead:{loans}"
    assert keys.finished("loans") == "keel:finished:{loans}"
    assert keys.finished_keyed("loans") == "keel:finkeyed:{loans}"
    assert keys.turn_index("loans") == "keel:turnidx:{loans}"
    assert keys.token_floor("loans") == "keel:tokfloor:{loans}"
    assert keys.wake("loans") == "keel:wake:{loans}"
    assert keys.event("loans", "e1") == "keel:event:{loans}:e1" == keys.event_stem("loans") + "e1"
    assert keys.events("loans") == "keel:events:{loans}"
    assert keys.event_times("loans") == "keel:evtime:{loans}"
    assert keys.event_times_keyed("loans") == "keel:evkeyed:{loans}"
    assert keys.event_keys("loans") == "keel:evidem:{loans}"


@pytest.mark.parametrize("part", TRICKY_PARTS)
def test_an_instance_member_splits_back_into_its_parts(part: str) -> None:
    for ref in (InstanceRef(part, "wf", "id"), InstanceRef("app", part, "id"), InstanceRef("app", "wf", part)):
        member = instance_member(ref)
        assert "{" not in member and "}" not in member
        assert member.count("/") == 2
        assert parse_instance_member(member) == (ref.app, ref.workflow, ref.workflow_id)


def test_distinct_instances_get_distinct_members() -> None:
    refs = {InstanceRef(a, w, i) for a in TRICKY_PARTS for w in TRICKY_PARTS[:3] for i in TRICKY_PARTS}
    assert len({instance_member(ref) for ref in refs}) == len(refs)


@pytest.mark.parametrize("part", TRICKY_PARTS)
def test_every_key_of_an_instance_shares_its_slot(part: str) -> None:
    keys = RedisKeys("tenant:")
    member = instance_member(InstanceRef("app{x}", "wf", part))
    names = [
        keys.instance(member),
        keys.inbox(member),
        keys.message(member, "m{1}"),
        keys.steps(member, "m{1}"),
        keys.ids(member),
        keys.idempotency(member),
        keys.states(member),
        keys.turns(member),
    ]
    assert {key_slot(name.encode()) for name in names} == {key_slot(member.encode())}


@pytest.mark.parametrize("app", TRICKY_KEYS)
def test_every_key_of_an_app_shares_its_slot(app: str) -> None:
    keys = RedisKeys()
    names = [
        keys.sequence(app),
        keys.message_index(app),
        keys.ready(app, "a"),
        keys.leased(app, "b{"),
        keys.dead(app),
        keys.finished(app),
        keys.finished_keyed(app),
        keys.turn_index(app),
        keys.token_floor(app),
        keys.wake(app),
        keys.event(app, "e{1}"),
        keys.events(app),
        keys.event_times(app),
        keys.event_times_keyed(app),
        keys.event_keys(app),
    ]
    assert {key_slot(name.encode()) for name in names} == {key_slot(hash_tag(app)[1:-1].encode())}

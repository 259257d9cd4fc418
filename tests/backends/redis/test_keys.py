"""The Redis key layout: names, hash tags that hold whatever the store key contains, and the URL prefix."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

import keel
from keel.backends.redis.keys import DEFAULT_PREFIX, RedisKeys, hash_tag, split_prefix

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

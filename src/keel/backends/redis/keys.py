"""Every Redis key name the engine uses, built here and nowhere else.

Layout, with the default prefix ``keel:`` (``?prefix=NAME`` in the URL picks another)::

    keel:schema        hash  component -> schema version ("store" -> "1"), written at connect
    keel:kv:{TAG}      hash  the current record of one store key: v version, d value JSON (absent in a
                             tombstone), t written_at in microseconds since the epoch, w writer
    keel:kvh:{TAG}     list  the kept versions of that key, newest first, as JSON entries

``TAG`` is the store key with ``%``, ``{`` and ``}`` percent-encoded. Redis Cluster hashes only what lies
between the first ``{`` and the next ``}``, so with no brace left inside, the tag cannot end early or
start late: both keys of one store key always share a slot, and a Lua script may touch them together.
The encoding is reversible, so two store keys never share a tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keel.errors import ConfigurationError

#: The prefix of every key when the URL names none.
DEFAULT_PREFIX = "keel:"

#: The URL query parameter that picks the prefix; keel's own, removed before redis-py sees the URL.
PREFIX_PARAM = "prefix"

# "%" first: it is the escape character, so it must be encoded before the escapes are written.
_TAG_ESCAPES = (("%", "%25"), ("{", "%7B"), ("}", "%7D"))


def hash_tag(key: str) -> str:
    """Return ``key`` as a cluster hash tag, braces included: ``a{b`` -> ``{a%7Bb}``."""
    for char, escaped in _TAG_ESCAPES:
        key = key.replace(char, escaped)
    return "{" + key + "}"


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

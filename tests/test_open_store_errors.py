"""Errors raised when opening a store: unknown schemes, missing extras, unreachable servers, bad options."""

from __future__ import annotations

import socket
import sys
import time

import pytest

import keel
from keel.backends._url import mask_password, scheme_of


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unknown_scheme_lists_the_supported_ones() -> None:
    with pytest.raises(keel.UnknownSchemeError) as caught:
        async with keel.open_store("mongodb://user:hunter2@127.0.0.1/db"):
            pass
    message = str(caught.value)
    for scheme in ("sqlite://", "postgresql://", "redis://", "memory://"):
        assert scheme in message
    assert "hunter2" not in message
    assert caught.value.scheme == "mongodb"


async def test_a_url_without_a_scheme_is_an_unknown_scheme() -> None:
    with pytest.raises(keel.UnknownSchemeError, match="supported schemes"):
        async with keel.open_store("keel.db"):
            pass


@pytest.mark.parametrize(
    ("url", "driver", "extra"), [("postgresql://x", "psycopg", "postgres"), ("redis://x", "redis", "redis")]
)
async def test_missing_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, url: str, driver: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, driver, None)  # makes `import driver` fail as if not installed
    with pytest.raises(keel.MissingExtraError) as caught:
        async with keel.open_store(url):
            pass
    assert f"pip install 'keel-runtime[{extra}]'" in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"history_limit": -1}, "history_limit"),
        ({"max_value_bytes": 0}, "max_value_bytes"),
        ({"update_deadline_s": -1.0}, "update_deadline_s"),
    ],
)
async def test_bad_options_are_refused(memory_url: str, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(keel.ConfigurationError, match=message):
        async with keel.open_store(memory_url, **kwargs):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize(
    "scheme", [pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("redis", marks=pytest.mark.redis)]
)
async def test_unreachable_server_is_backend_unavailable_with_the_password_masked(scheme: str) -> None:
    pytest.importorskip("psycopg" if scheme == "postgresql" else "redis")
    port = _closed_port()
    url = f"{scheme}://keeluser:s3cret-pw@127.0.0.1:{port}/0"
    started = time.monotonic()
    with pytest.raises(keel.BackendUnavailable) as caught:
        async with keel.open_store(url):
            pass
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert f"keeluser:***@127.0.0.1:{port}" in message
    assert caught.value.hint  # says what to check


def test_mask_password() -> None:
    assert mask_password("postgresql://u:p@h:5/db?x=1") == "postgresql://u:***@h:5/db?x=1"
    assert mask_password("redis://:p@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert mask_password("sqlite:///a.db") == "sqlite:///a.db"


def test_scheme_of() -> None:
    assert scheme_of("postgresql+psycopg://h/db") == "postgresql"
    assert scheme_of("REDIS://h") == "redis"
    assert scheme_of("plain") == ""

"""SQLite-only behaviour: pragmas, paths, refusals, schema versions, and a loop that never blocks."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import keel
from keel.backends.sqlite import location
from keel.backends.sqlite.migrate import SCHEMA_VERSION


def _pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


async def test_database_is_wal_with_full_sync_by_default(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    async with keel.open_store(f"sqlite:///{path}") as store:
        await store.put("k", 1, expected_version=None)
        engine = store._engine  # the engine's own connection reports its pragmas
        sync = await engine.database.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[attr-defined]
        busy_s = engine.database.busy_timeout_s  # type: ignore[attr-defined]
    assert _pragma(path, "journal_mode") == "wal"
    assert sync == 2  # FULL
    assert busy_s == 30.0


async def test_synchronous_and_busy_timeout_come_from_the_url(tmp_path: Path) -> None:
    async with keel.open_store(f"sqlite:///{tmp_path / 'k.db'}?synchronous=normal&busy_timeout_s=2") as store:
        engine = store._engine
        sync = await engine.database.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[attr-defined]
        busy_s = engine.database.busy_timeout_s  # type: ignore[attr-defined]
    assert (sync, busy_s) == (1, 2.0)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("synchronous=sometimes", "synchronous"),
        ("busy_timeout_s=-1", "busy_timeout_s"),
        ("busy_timeout_s=soon", "busy_timeout_s"),
        ("journal=delete", "unknown SQLite URL option"),
    ],
)
async def test_bad_url_options_are_refused(tmp_path: Path, query: str, message: str) -> None:
    with pytest.raises(keel.ConfigurationError, match=message):
        async with keel.open_store(f"sqlite:///{tmp_path / 'k.db'}?{query}"):
            pass
    assert not (tmp_path / "k.db").exists()


async def test_relative_path_is_resolved_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="keel"):
        async with keel.open_store("sqlite:///sub-relative.db") as store:
            await store.put("k", 1, expected_version=None)
            assert store.url == f"sqlite:///{tmp_path / 'sub-relative.db'}"
    assert (tmp_path / "sub-relative.db").exists()
    assert any(str(tmp_path / "sub-relative.db") in r.getMessage() for r in caplog.records)


async def test_default_url_is_keel_db_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEEL_URL", raising=False)
    async with keel.open_store() as store:
        await store.put("k", 1, expected_version=None)
    assert (tmp_path / "keel.db").exists()


async def test_keel_url_variable_is_used_when_no_url_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    async with keel.open_store() as store:
        await store.put("k", 1, expected_version=None)
    assert (tmp_path / "from-env.db").exists()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
async def test_urls_naming_no_file_are_refused(url: str) -> None:
    with pytest.raises(keel.ConfigurationError, match="names no database file"):
        async with keel.open_store(url):
            pass


async def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(keel.ConfigurationError, match="does not exist"):
        async with keel.open_store(f"sqlite:///{tmp_path / 'nope' / 'k.db'}"):
            pass


async def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    path.write_bytes(b"this is not a sqlite file at all" * 100)
    with pytest.raises(keel.BackendUnavailable, match="not a database"):
        async with keel.open_store(f"sqlite:///{path}"):
            pass
    assert path.read_bytes().startswith(b"this is not a sqlite file")


async def test_network_filesystem_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share = tmp_path / "share"
    share.mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n"
        f"90 22 0:50 / {share} rw,relatime - nfs4 server:/export rw,vers=4.2\n"
    )
    monkeypatch.setattr(location, "_MOUNTINFO", mountinfo)
    with pytest.raises(keel.UnsafeLocationError, match="nfs4") as caught:
        async with keel.open_store(f"sqlite:///{share / 'k.db'}"):
            pass
    assert caught.value.fstype == "nfs4"
    assert not (share / "k.db").exists()
    async with keel.open_store(f"sqlite:///{tmp_path / 'local.db'}") as store:  # ext4 is fine
        await store.put("k", 1, expected_version=None)


def test_filesystem_type_reads_this_machine() -> None:
    assert location.filesystem_type(Path("/")) not in (None, "")


async def test_schema_version_is_recorded_and_newer_schemas_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    async with keel.open_store(f"sqlite:///{path}") as store:
        await store.put("k", 1, expected_version=None)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM keel_schema WHERE component = 'store'").fetchone() == (SCHEMA_VERSION,)
        conn.execute("UPDATE keel_schema SET version = 99 WHERE component = 'store'")
    with pytest.raises(keel.ConfigurationError, match="schema version 99"):
        async with keel.open_store(f"sqlite:///{path}"):
            pass


async def test_two_stores_open_one_file_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    async with keel.open_store(url) as a, keel.open_store(url) as b:
        await a.put("k", 1, expected_version=None)
        with pytest.raises(keel.StaleWriteError):
            await b.put("k", 2, expected_version=None)
        assert (await b.update("k", lambda n: n + 1)).version == 2


async def test_waiting_for_another_writer_never_blocks_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    async with keel.open_store(f"sqlite:///{path}") as store:
        await store.put("k", 1, expected_version=None)
        locked = threading.Event()

        def hold_write_lock() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(0.6)
            conn.execute("ROLLBACK")
            conn.close()

        holder = threading.Thread(target=hold_write_lock)
        holder.start()
        locked.wait()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        await store.put("k", 2, expected_version=1)  # waits on the lock, on the store's own thread
        waited = time.monotonic() - started
        ticker.cancel()
        holder.join()
    assert waited >= 0.4
    assert ticks >= 20  # the loop kept running while the write waited


async def test_busy_timeout_gives_backend_overloaded_not_a_hang_nor_an_outage(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    async with keel.open_store(f"sqlite:///{path}?busy_timeout_s=0.2") as store:
        await store.put("k", 1, expected_version=None)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(keel.BackendOverloaded) as caught:
                await store.put("k", 2, expected_version=1)
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        assert not isinstance(caught.value, keel.BackendUnavailable)  # the file answers: another process held it
        assert (caught.value.waited_s, caught.value.connections) == (0.2, 1)
        assert "is overloaded, not down: a call waited 0.2 s" in str(caught.value)
        assert "busy_timeout_s=" in str(caught.value)
        current = await store.get("k")
        assert current is not None
        assert current.version == 1  # nothing was written
        assert (await store.put("k", 2, expected_version=1)).version == 2  # the lock free, the same store writes


async def test_unclosed_store_warns(tmp_path: Path) -> None:
    from keel.backends.sqlite.connection import SqliteDatabase

    database = SqliteDatabase(tmp_path / "k.db", "sqlite:///k.db", synchronous="FULL", busy_timeout_s=1)
    await database.open()
    with pytest.warns(ResourceWarning, match="not closed"):
        database.__del__()
    await database.aclose()


async def test_opening_waits_out_a_transaction_on_a_file_not_yet_in_wal_mode(tmp_path: Path) -> None:
    # Switching to WAL needs an exclusive lock, which SQLite refuses at once (without the busy handler) while
    # another connection is mid-transaction on a file still in rollback-journal mode, as another process's
    # first open can be: keel must wait that out, not fail.
    path = tmp_path / "fresh.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE someone_elses (x)")
    released = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    released.start()
    try:
        async with keel.open_store(f"sqlite:///{path}") as store:
            await store.put("k", 1, expected_version=None)
    finally:
        released.join()
        holder.close()
    assert _pragma(path, "journal_mode") == "wal"

"""``keel demo``: run as a real command, whose processes really race; bad options fail clearly."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import keel
from keel.cli import RET_FAILED, RET_LOST_UPDATES, RET_NAIVE_LOST_NOTHING, RET_OK, main
from keel.demo import DemoReport, DemoSettings, Verdict, WayResult
from keel.demo.report import verdict
from keel.demo.ways import Way

PROCESSES = 3
UPDATES = 40
ATTEMPTED = PROCESSES * UPDATES


def run_keel(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``keel`` as CI would: stdout and stderr piped, no terminal, nothing on stdin."""
    env = {k: v for k, v in os.environ.items() if k not in {"FORCE_COLOR", "TTY_COMPATIBLE", "KEEL_URL"}}
    env["COLUMNS"] = "200"  # so that no line the assertions look for is wrapped
    return subprocess.run(
        [sys.executable, "-m", "keel.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=120,
        check=False,
    )


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_keel("demo", "--processes", str(PROCESSES), "--updates", str(UPDATES), *args)


def table_row(output: str, label: str) -> str:
    """The final table's row for one way (the progress lines have no │)."""
    rows = [line for line in output.splitlines() if label in line and "│" in line]
    assert len(rows) == 1, output
    return rows[0]


def assert_demo_proved_its_point(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == RET_OK, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    # Both naive ways are forced to keep one process's worth of updates, every time.
    assert "40 of 120 — 80 lost" in table_row(done.stdout, "in-memory copy per replica")
    assert "40 of 120 — 80 lost" in table_row(done.stdout, "shared record, get then set")
    keel_row = table_row(done.stdout, "keel store.update")
    assert "120 of 120 — none lost" in keel_row
    # Every round, all processes read one version and only one write on it can succeed: the others retry.
    retried = int(keel_row.rsplit("│", 2)[1].strip().replace(",", ""))
    assert retried >= (PROCESSES - 1) * UPDATES
    assert "keel lost no update." in done.stdout


pytestmark = pytest.mark.processes


@pytest.mark.slow
def test_default_backend_keel_applies_all_naive_ways_lose_some() -> None:
    done = run_demo()
    assert_demo_proved_its_point(done)
    found = re.search(r"Backend: sqlite:///(\S+) \(a temporary file, removed afterwards\)", done.stdout)
    assert found, done.stdout
    assert not Path(found.group(1)).parent.exists()


@pytest.mark.slow
async def test_keys_are_cleaned_up_so_runs_can_repeat_on_one_backend(sqlite_url: str) -> None:
    for _ in range(2):
        assert_demo_proved_its_point(run_demo("--url", sqlite_url, "--key", "again"))
    async with keel.open_store(sqlite_url) as store:
        assert await store.get("again:get-then-set") is None
        assert await store.get("again:update") is None


@pytest.mark.slow
async def test_a_key_in_use_is_refused_and_left_alone(sqlite_url: str) -> None:
    async with keel.open_store(sqlite_url) as store:
        await store.put("busy:update", 7, expected_version=None)
    done = run_demo("--url", sqlite_url, "--key", "busy")
    assert done.returncode == RET_FAILED
    assert "Error: key 'busy:update' already holds a value" in done.stderr
    assert "Traceback" not in done.stderr
    async with keel.open_store(sqlite_url) as store:
        current = await store.get("busy:update")
        assert current is not None
        assert current.value == 7
        assert await store.get("busy:get-then-set") is None  # claimed first, then released


def _engine_written(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.parametrize(
    "url_fixture",
    [
        pytest.param(
            "redis_url",
            marks=[
                pytest.mark.redis,
                pytest.mark.skipif(not _engine_written("keel.backends.redis.store"), reason="no Redis engine yet"),
            ],
        ),
        pytest.param(
            "postgres_url",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(
                    not _engine_written("keel.backends.postgres.store"), reason="no PostgreSQL engine yet"
                ),
            ],
        ),
    ],
)
def test_shared_backends(url_fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(url_fixture)
    assert_demo_proved_its_point(run_demo("--url", url))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "1"], "Invalid value for '--processes': 1 is not in the range x>=2"),
        (["--updates", "0"], "Invalid value for '--updates': 0 is not in the range x>=1"),
        (["--processes", "many"], "Invalid value for '--processes': 'many' is not a valid integer"),
        (["--url", "nope://x"], "Invalid value for '--url': unknown backend scheme 'nope'"),
        (["--url", "memory://"], "Invalid value for '--url': memory:// lives inside one process"),
        (["--url", "sqlite:////no/such/folder/demo.db"], "the folder /no/such/folder does not exist"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["demo", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_file_that_is_not_a_database_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database.db"
    path.write_bytes(b"this is not SQLite " * 200)
    done = run_keel("demo", "--url", f"sqlite:///{path}")
    assert done.returncode == RET_FAILED
    assert "is unavailable: file is not a database" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_explains_the_url() -> None:
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    assert "postgresql://" in result.output
    assert "temporary folder" in result.output


@pytest.mark.parametrize(
    ("keel_applied", "naive_applied", "expected"),
    [
        (120, 40, Verdict.ok),
        (119, 40, Verdict.keel_lost),
        (120, 120, Verdict.naive_lost_nothing),
    ],
)
def test_verdict(keel_applied: int, naive_applied: int, expected: Verdict) -> None:
    results = [
        WayResult(Way.in_memory, applied=40, attempted=ATTEMPTED),
        WayResult(Way.get_then_set, applied=naive_applied, attempted=ATTEMPTED),
        WayResult(Way.keel_update, applied=keel_applied, attempted=ATTEMPTED, retried=80),
    ]
    assert verdict(results) is expected


@pytest.mark.parametrize(
    ("found", "code"),
    [(Verdict.ok, RET_OK), (Verdict.keel_lost, RET_LOST_UPDATES), (Verdict.naive_lost_nothing, RET_NAIVE_LOST_NOTHING)],
)
def test_exit_code_follows_the_verdict(found: Verdict, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run_demo(settings: DemoSettings, console: object) -> DemoReport:
        return DemoReport(url="sqlite:///x.db", results=[], verdict=found)

    monkeypatch.setattr("keel.cli.run_demo", fake_run_demo)
    assert CliRunner().invoke(main, ["demo"]).exit_code == code

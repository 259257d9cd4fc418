"""`keel worker`, `keel send` and `keel state` as a user runs them: real subprocesses on SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.processes._workers import APP_PATH, ROOT, WorkerProcess

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.processes


def keel(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    return subprocess.run(
        [sys.executable, "-m", "keel.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=env,
        check=False,
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_send_then_state_through_a_worker(url: str, tmp_path: Path) -> None:
    worker = WorkerProcess(url, tmp_path / "worker.log", lease_s=2.0)
    try:
        worker.wait_for_log("started for app process-tests")
        sent = keel("send", APP_PATH, "counter", "c1", '{"seq": 7}', "--url", url, "--wait", "30")
        assert sent.returncode == 0, sent.stderr
        message_id, state_text = sent.stdout.split("\n", 1)
        assert len(message_id) == 32
        shown = keel("state", APP_PATH, "counter", "c1", "--url", url)
        assert shown.returncode == 0, shown.stderr
        document = json.loads(shown.stdout)
        assert json.loads(state_text) == document
        assert (document["version"], document["state"]["applied"]) == (1, [7])
        again = keel("send", APP_PATH, "counter", "c1", '{"seq": 8}', "--url", url, "--idempotency-key", "k1")
        repeat = keel("send", APP_PATH, "counter", "c1", '{"seq": 8}', "--url", url, "--idempotency-key", "k1")
        assert again.stdout == repeat.stdout
    finally:
        assert worker.stop() == 0
    assert "turn committed" in worker.log()
    assert "workflow=counter workflow_id=c1" in worker.log()


def test_state_of_an_instance_without_a_turn(url: str) -> None:
    result = keel("state", APP_PATH, "counter", "nobody", "--url", url)
    assert result.returncode == 2
    assert "no committed state" in result.stderr
    assert "Usage:" not in result.stderr  # the options were right: no banner, just what is wrong


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", APP_PATH, "counterr", "c1", '{"seq": 1}'], "registered workflows: counter"),
        (["state", APP_PATH, "counterr", "c1"], "registered workflows: counter"),
        (["send", APP_PATH, "counter", "c1", "{not json"], "not JSON"),
        (["send", APP_PATH, "counter", "c1", '{"seq": "one"}'], "seq"),
        (["send", "no.such.module:app", "counter", "c1", "{}"], "cannot import module 'no.such.module'"),
        (["send", "tests.processes.workflows:nothing", "counter", "c1", "{}"], "names nothing, not a keel.App"),
        (["send", "no-colon", "counter", "c1", "{}"], "is not MODULE:APP"),
        (["worker", APP_PATH, "--url", "memory://"], "memory:// lives inside one process"),
        (["worker", APP_PATH, "--url", "mongodb://x"], "supported schemes"),
        (["worker", APP_PATH, "--only", "confirm", "--only", "nope"], "--only nope: app 'process-tests' has no such"),
        (["events", APP_PATH, "--limit", "0"], "--limit"),
        (["publish", APP_PATH, "Nope", "{}"], "registered event types: Placed, Relay, Relayed"),
        (["publish", APP_PATH, "Placed", '{"order_id": "p1"}'], "ledger: Field required"),
        (["publish", APP_PATH, "Placed", "{oops"], "not JSON"),
        (["retry", APP_PATH, "on/nobody", "e1"], "registered handlers: bill, confirm"),
        (["retry", APP_PATH, "--handler", "nobody", "e1"], "registered handlers: bill, confirm"),
        (["send", APP_PATH, "counter", "c1", '{"seq": 1}', "--url", "memory://"], "cannot use memory://"),
    ],
)
def test_bad_input_gets_a_clear_error_and_no_traceback(url: str, args: list[str], message: str) -> None:
    if "--url" not in args:
        args = [*args, "--url", url]
    result = keel(*args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_send_to_an_unreachable_backend_fails_clearly() -> None:
    result = keel("send", APP_PATH, "counter", "c1", '{"seq": 1}', "--url", "redis://:pw@127.0.0.1:1/0")
    assert result.returncode == 4
    assert "unavailable" in result.stderr and "pw" not in result.stderr


def test_dead_letters_are_listed_skipped_and_retried_from_the_command_line(url: str, tmp_path: Path) -> None:
    worker = WorkerProcess(url, tmp_path / "worker.log", lease_s=2.0)
    try:
        worker.wait_for_log("started for app process-tests")
        failed = keel("send", APP_PATH, "counter", "d1", '{"seq": 1, "fail": true}', "--url", url, "--wait", "30")
        assert failed.returncode == 4
        assert "told to fail" in failed.stderr and "Traceback" not in failed.stderr
        later = keel("send", APP_PATH, "counter", "d1", '{"seq": 2}', "--url", url)
        listed = keel("dead", APP_PATH, "--url", url)
        assert listed.returncode == 0
        assert "counter d1" in listed.stdout and "told to fail" in listed.stdout
        assert f"keel retry {APP_PATH} counter d1 --url {url} runs it again" in listed.stdout
        skipped = keel("skip", APP_PATH, "counter", "d1", "--url", url)
        assert skipped.returncode == 0 and "skipped message" in skipped.stdout
        shown = keel("send", APP_PATH, "counter", "d1", '{"seq": 3}', "--url", url, "--wait", "30")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout.split("\n", 1)[1])["state"]["applied"] == [2, 3]
        assert later.stdout.strip()
        nothing = keel("retry", APP_PATH, "counter", "d1", "--url", url)
        assert nothing.returncode == 2 and "not paused" in nothing.stderr
        assert keel("dead", APP_PATH, "--url", url).stdout.strip() == "no dead letters"
    finally:
        assert worker.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_stops_cleanly_on_sigterm_and_ctrl_c(url: str, tmp_path: Path, sig: signal.Signals) -> None:
    worker = WorkerProcess(url, tmp_path / "worker.log", lease_s=2.0)
    worker.wait_for_log("started for app process-tests")
    worker.signal(sig)
    assert worker.proc.wait(20) == 0
    worker.stop()
    assert "stopped" in worker.log()


def test_trace_rebuilds_an_instances_timeline(url: str, tmp_path: Path) -> None:
    worker = WorkerProcess(url, tmp_path / "worker.log", lease_s=2.0)
    try:
        worker.wait_for_log("started for app process-tests")
        assert keel("send", APP_PATH, "counter", "tr", '{"seq": 1}', "--url", url, "--wait", "30").returncode == 0
        failed = keel("send", APP_PATH, "counter", "tr", '{"seq": 2, "fail": true}', "--url", url, "--wait", "30")
        assert failed.returncode == 4
        shown = keel("trace", APP_PATH, "counter", "tr", "--url", url)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == "counter tr: 2 turn record(s), state version 1"
        assert "committed" in lines[1] and "v0 -> v1" in lines[1] and worker.identity in lines[1]
        assert "failed" in lines[2] and "v1 -> -" in lines[2]
        assert "told to fail" in lines[3]
        as_json = json.loads(keel("trace", APP_PATH, "counter", "tr", "--url", url, "--json").stdout)
        assert [t["outcome"] for t in as_json] == ["committed", "failed"]
        assert as_json[0]["fencing_token"] < as_json[1]["fencing_token"]
        nothing = keel("trace", APP_PATH, "counter", "nobody", "--url", url)
        assert nothing.returncode == 0 and "no turn recorded" in nothing.stdout
    finally:
        assert worker.stop() == 0

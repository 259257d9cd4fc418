"""The examples in examples/ and the README run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_store_quickstart_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "store_quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "refused: stale write to 'loan:42'" in result.stdout
    assert "version 1 -> 2" in result.stdout


def test_readme_store_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    store_blocks = [b for b in blocks if "open_store" in b]
    assert store_blocks, "README.md shows the store API in a ```python block"
    script = tmp_path / "readme_example.py"
    script.write_text(store_blocks[0])
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_loans_example_runs_a_worker_and_commits_three_turns() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "loans.py")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "committed state version 3" in result.stdout
    assert "requested=6500" in result.stdout
    for line in ("loan 42 approved at 1000", "loan 42 approved at 3500", "loan 42 declined at 6500"):
        assert f"notified: {line}" in result.stdout
    assert result.stdout.count("notified:") == 3  # each turn's event reached the handler once


def test_readme_workflow_example_registers(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL) if "app.workflow" in b]
    assert blocks
    script = tmp_path / "readme_workflow.py"
    script.write_text(blocks[0] + "\nassert list(app.workflows) == ['loan']\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr

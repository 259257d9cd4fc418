"""Each peer's own virtual environment under ``bench/.peers/``, built from its pinned requirements on first use.

A peer is never installed into keel's environment: ``bench/peers/requirements-<peer>.txt`` lists every package
with its version, and the environment is rebuilt whenever that file changes (a hash of it is kept inside).
"""

from __future__ import annotations

import hashlib
import subprocess
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Where the peers' environments live (ignored by git).
PEERS_DIR = HERE.parent / ".peers"


def requirements(peer: str) -> Path:
    path = HERE / f"requirements-{peer}.txt"
    if not path.exists():
        raise SystemExit(f"no pinned requirements for peer {peer!r}: expected {path}")
    return path


def python_of(peer: str) -> Path:
    """The Python of ``peer``'s environment, created or rebuilt first if its requirements changed."""
    pinned = requirements(peer)
    home = PEERS_DIR / peer
    python = home / "bin" / "python"
    stamp = home / "requirements.sha256"
    wanted = hashlib.sha256(pinned.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"building {home} from {pinned.name} (once)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(home)
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(pinned)]
    # pip's output only when it fails: this machine's pip configuration prints a warning per package.
    done = subprocess.run(install, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"could not install {pinned.name} into {home}:\n{done.stdout}{done.stderr}")
    stamp.write_text(wanted)
    return python

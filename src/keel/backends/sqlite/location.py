"""Where a SQLite database lives: URL to absolute path, keel's lock file next to it, network filesystems refused."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from keel.errors import ConfigurationError, UnsafeLocationError

logger = logging.getLogger(__name__)

#: Filesystems whose locking SQLite cannot rely on (the SQLite FAQ: "file locking is broken on many NFS").
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smbfs", "smb3", "9p", "afs", "ceph", "glusterfs", "lustre", "fuse.sshfs", "fuse.s3fs"}
)

_MOUNTINFO = Path("/proc/self/mountinfo")


def database_path(url: str) -> Path:
    """Return the absolute path a ``sqlite:///...`` URL names, logging it when the URL gave a relative one.

    ``sqlite:///keel.db`` is relative to the current folder; ``sqlite:////var/lib/keel.db`` is absolute.

    Raises:
        ConfigurationError: The URL names no file, an in-memory database, or a folder that does not exist.
    """
    raw = unquote(urlsplit(url).path)
    if raw.startswith("/"):
        raw = raw[1:]  # the third slash of sqlite:/// separates the (empty) host from the path
    if not raw or raw == ":memory:":
        raise ConfigurationError(
            f"{url!r} names no database file: use sqlite:///relative/path.db or sqlite:////absolute/path.db "
            "(an in-memory SQLite database cannot be shared; use memory:// for single-process tests)"
        )
    given = Path(raw).expanduser()
    path = given.resolve()
    if not given.is_absolute():
        # Two processes started in different folders must not silently use two files.
        logger.info("SQLite database %s resolved to %s", raw, path, extra={"database": str(path)})
    if not path.parent.is_dir():
        raise ConfigurationError(f"cannot create SQLite database {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise ConfigurationError(f"cannot use {path} as a SQLite database: it is a folder")
    return path


def lock_path(database: Path) -> Path:
    """The file next to ``database`` whose ``flock`` keel's writers take turns at (``writelock``).

    Next to it, like SQLite's own ``-wal`` and ``-shm``: every process that can open the database finds it there, and it
    is on the same (local) filesystem. It is never removed; it is empty and costs an inode.
    """
    return database.with_name(database.name + "-keel-lock")


def refuse_network_filesystem(path: Path) -> None:
    """Raise if ``path`` is on a network filesystem, where that can be detected (Linux mountinfo).

    Raises:
        UnsafeLocationError: The database's folder is on NFS, SMB or a similar network filesystem.
    """
    fstype = filesystem_type(path.parent)
    if fstype is not None and (fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs")):
        raise UnsafeLocationError(str(path), fstype)


def filesystem_type(folder: Path) -> str | None:
    """Return the type of the filesystem holding ``folder``, or None where the system does not say."""
    try:
        lines = _MOUNTINFO.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    target = os.path.realpath(folder)
    best_point, best_type = "", None
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields:
            continue
        point = _unescape_mount(fields[4])
        fstype = fields[fields.index("-") + 1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best_point):
            best_point, best_type = point, fstype
    return best_type


def _unescape_mount(field: str) -> str:
    # mountinfo writes spaces, tabs, newlines and backslashes in paths as octal escapes.
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")

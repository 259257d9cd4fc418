"""The SQLite wake transport: a Unix datagram socket per waiting backend, one folder per file, and a poll of the file.

The waiters and the wake rule are the backend's ``keel.backends.wake.WakeGate`` (which also wakes the backends of
this process on the same file, or on the same in-memory database, at once); ``SqliteWake`` tells it what the
doorbell hears and what the poll finds.

SQLite cannot notify another process, so the processes sharing a file ring each other's doorbells:

- Folder: ``<tempdir>/keel-wake-<hash>/``, the hash of this user's id and the file's real path. It is short
  whatever the file's path (a socket's path holds at most ~107 bytes), the same for every process of this user on
  the file, and private: mode 0700 and this user's, or it is not used at all.
- Listening: a backend that waits for work binds a datagram socket there (``<pid>-<random>``), and its event loop
  reads it (``loop.add_reader``): each datagram is an app's name, and wakes that app's waiters.
- Ringing: after a transaction that made work visible commits, the writer sends the app's name to every other
  socket in the folder, without blocking. A socket that refuses it (or is gone) belonged to a process that died
  without cleaning up, and is removed; a full one has wake-ups pending already, so one more adds nothing.

Nothing depends on a datagram arriving: waiters go on polling the file, so a lost wake-up, a sender with another
temporary folder, or a folder that cannot be used (one warning, then polling only) costs latency, never work.
The last process to close removes the folder; one binding at that moment makes it again.

The ends of messages (``Reader.wait_for_end``: what ``client.wait`` waits for) travel the same way, through a
second folder, ``<tempdir>/keel-ends-<hash>/``, where only backends waiting for an end bind a socket: a commit, a
dead letter or a skip rings each socket there with ``APP NUL MESSAGE_ID`` (no NUL is in an app's name), so workers
never hear of ends and a commit with nobody waiting lists an empty folder and sends nothing. A datagram that does
not parse, or an end too long for one (an empty datagram goes out instead), makes every wait of that backend read
its status again; a lost one is made up for by the waits' own re-reads (``EndWaiters.recheck_s``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from keel.backends.sqlite.rows import now_us
from keel.backends.sqlite.transactions import QUERIES

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterable

    from keel.backends.ends import EndWaiters
    from keel.backends.sqlite.connection import Database
    from keel.backends.wake import WakeGate

logger = logging.getLogger(__name__)

#: How many times binding is tried when the folder disappears in between (removed by the last process leaving it).
_BIND_ATTEMPTS = 3

#: The longest app name a datagram carries; for a longer one an empty datagram goes out, which wakes every app.
RING_BYTES = 512


#: What a backend whose doorbell cannot be used falls back on, as its one warning says.
_POLL_FALLBACK = "idle workers on this SQLite file will find new work by polling only"
_RECHECK_FALLBACK = "waits for turns on this SQLite file will notice their ends by reading again now and then only"

#: The longest end (app, NUL, message id) a datagram carries; ids and names are at most 255 characters each.
END_BYTES = 2048


def wake_folder(database: Path) -> Path:
    """The folder where the processes of this user on ``database`` bind their sockets to hear of work."""
    return _folder(database, "wake")


def ends_folder(database: Path) -> Path:
    """The folder where the backends of this user waiting for ends of messages on ``database`` bind their sockets."""
    return _folder(database, "ends")


def _folder(database: Path, kind: str) -> Path:
    key = f"{os.getuid() if hasattr(os, 'getuid') else 0}:{os.path.realpath(database)}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"keel-{kind}-{digest}"


class SqliteWake:
    """What one SQLite backend hears of work and of ends: its two doorbells, and the poll of the file for work."""

    def __init__(self, database: Database, gate: WakeGate, ends: EndWaiters) -> None:
        self._database = database
        self._gate = gate
        self._ends = ends
        self._doorbell = Doorbell(wake_folder(database.path))
        self._end_bell = Doorbell(ends_folder(database.path), max_bytes=END_BYTES, fallback=_RECHECK_FALLBACK)
        #: Per app, the newest seq the last claim saw (0 after a claim that filled its limit: work may be left) and
        #: the clock reading it was made at (a next message visible since then may be work).
        self._seen: dict[str, tuple[int, int]] = {}
        #: Apps whose last wait returned with no claim since: the next poll starts from where the file stands then.
        self._returned: set[str] = set()

    def claimed(self, app: str, latest_seq: int, now_us: int) -> None:
        """Note what a claim of ``app`` saw: the poll looks for work after it."""
        self._seen[app] = (latest_seq, now_us)
        self._returned.discard(app)

    def returned(self, app: str) -> None:
        """Note that a wait for ``app`` returned: what the file held by then no longer ends the next one.

        The gate still counts what is announced from now on; what is not announced (a lost datagram, a timer coming
        due) in between is found by the next claim, or the next wait's timeout.
        """
        self._returned.add(app)

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the doorbell heard on ``loop`` (bound once; a folder that cannot be used leaves the poll alone)."""
        self._doorbell.listen(loop, self._rung)

    def listen_for_ends(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the ends doorbell heard on ``loop`` (bound once; an unusable folder leaves the waits' re-reads)."""
        self._end_bell.listen(loop, self._ended)

    def ring(self, *apps: str, ended: tuple[str, str] | None = None) -> Callable[[object], None] | None:
        """What a write runs after its commit: ring the others for ``apps`` and the ``(app, message_id)`` it ended.

        None if there is nothing to ring.
        """
        if not apps and ended is None:
            return None

        def rung(_: object) -> None:
            if apps:
                self._doorbell.ring(apps)
            if ended is not None:
                self._end_bell.ring(("\0".join(ended),))

        return rung

    def ring_if_found(self, app: str, *, ends: bool = False) -> Callable[[str | None], None]:
        """What a write whose result may be None (nothing done) runs after its commit.

        With ``ends``, the message id it returns is one it ended (a skipped dead letter).
        """

        def rung(found: str | None) -> None:
            if found is not None:
                self._doorbell.ring((app,))
                if ends:
                    self._end_bell.ring((f"{app}\0{found}",))

        return rung

    async def has_new_work(self, app: str) -> bool:
        """True if the file shows work since the last claim of ``app`` (or the last wait, or look, that found some)."""
        seen = self._seen.get(app)
        if seen is None or app in self._returned:  # no claim yet, or none since the last wait: from now on
            self._returned.discard(app)
            since = now_us()
            self._seen[app] = ((await self._work_signals(app, since))[0], since)
            return False
        seen_seq, since_us = seen
        latest, due_us = await self._work_signals(app, since_us)
        now = now_us()
        if latest > seen_seq or (due_us is not None and due_us <= now):
            self._seen[app] = (latest, now)  # found once: the next wait does not return for it again
            return True
        return False

    def close(self) -> None:
        """Stop listening and remove this backend's sockets. Safe to call twice."""
        self._doorbell.close()
        self._end_bell.close()

    async def _work_signals(self, app: str, since_us: int) -> tuple[int, int | None]:
        """The app's newest seq, and the first visible time of a next message after ``since_us`` (None if none)."""
        params = {"app": app, "since_us": since_us}
        query = QUERIES["work_signals"]
        latest, due_us = await self._database.run(lambda conn: conn.execute(query, params).fetchone())
        return int(latest), None if due_us is None else int(due_us)

    def _rung(self, apps: Iterable[str]) -> None:
        if "" in apps:  # a name too long for a datagram: every app
            self._gate.wake_all()
        for app in apps:
            if app:
                self._gate.wake(app)

    def _ended(self, ends: Iterable[str]) -> None:
        for end in ends:
            app, nul, message_id = end.partition("\0")
            if nul and app and message_id:
                self._ends.heard(app, message_id)
            else:  # too long for a datagram, or not from keel: every wait reads again rather than guess
                self._ends.recheck()


class Doorbell:
    """This backend's socket in one folder of its file (work or ends), and the ringing of everyone else's there."""

    def __init__(self, folder: Path, *, max_bytes: int = RING_BYTES, fallback: str = _POLL_FALLBACK) -> None:
        self.folder = folder
        self._max_bytes = max_bytes
        self._fallback = fallback
        self._listener: socket.socket | None = None
        self._address: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sender: socket.socket | None = None
        self._unusable = False
        self._closed = False

    @property
    def listening(self) -> bool:
        """True while this backend's socket is bound and read by an event loop."""
        return self._loop is not None and not self._loop.is_closed()

    def listen(self, loop: asyncio.AbstractEventLoop, on_ring: Callable[[set[str]], None]) -> bool:
        """Bind this backend's socket (once) and have ``loop`` read it, calling ``on_ring`` with the apps rung.

        The apps rung may include ``""``: every app (a name too long for a datagram).

        Returns:
            False if the folder or the socket cannot be used (logged once, as a warning): waiters must poll.
        """
        if self._loop is loop and not loop.is_closed():
            return True
        if self._unusable or self._closed:
            return False
        try:
            listener = self._listener or self._bind()
            if self.listening:
                assert self._loop is not None
                self._loop.remove_reader(listener.fileno())
            loop.add_reader(listener.fileno(), self._drain, listener, on_ring)
        except (OSError, NotImplementedError) as exc:
            self._unusable = True
            logger.warning(
                "cannot listen for wake-ups in %s (%s): %s",
                self.folder,
                exc,
                self._fallback,
                extra={"folder": str(self.folder)},
            )
            return False
        self._loop = loop
        return True

    def ring(self, apps: Iterable[str]) -> None:
        """Tell every other socket in the folder that ``apps`` may have work; never raises, never blocks."""
        if self._closed:
            return
        try:
            targets = self._targets()
        except OSError:
            return  # no folder means nobody listens; an unusable one, that listeners warned and poll
        if not targets:
            return
        for app in apps:
            payload = app.encode("utf-8", "surrogatepass")
            if len(payload) > self._max_bytes:
                payload = b""
            for target in targets:
                self._send(payload, target)

    def close(self) -> None:
        """Stop listening, and close and remove this backend's socket. Safe to call twice."""
        self._closed = True
        if self._listener is not None:
            if self.listening:
                assert self._loop is not None
                self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._address is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._address)
                os.rmdir(self.folder)  # only if this was the last socket in it
            self._address = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._loop = None

    def _bind(self) -> socket.socket:
        address = str(self.folder / f"{os.getpid()}-{secrets.token_hex(4)}")
        for _ in range(_BIND_ATTEMPTS - 1):
            with contextlib.suppress(FileNotFoundError):  # the last process leaving removed the folder meanwhile
                return self._bind_at(address)
        return self._bind_at(address)

    def _bind_at(self, address: str) -> socket.socket:
        _make_private_folder(self.folder)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            listener.setblocking(False)
            listener.bind(address)
        except OSError:
            listener.close()
            raise
        self._listener, self._address = listener, address
        return listener

    def _drain(self, listener: socket.socket, on_ring: Callable[[set[str]], None]) -> None:
        apps: set[str] = set()
        while True:
            try:
                data = listener.recv(self._max_bytes + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # not seen in practice; the poll still finds the work
                logger.debug("reading wake-ups failed: %s", exc)
                break
            apps.add(_app_of(data))
        if apps:
            on_ring(apps)

    def _targets(self) -> list[str]:
        _check_private(self.folder)  # every time: the folder may have been removed and made again since
        folder, own = str(self.folder), self._address
        return [path for path in (os.path.join(folder, name) for name in os.listdir(folder)) if path != own]

    def _send(self, payload: bytes, target: str) -> None:
        if self._sender is None:
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.setblocking(False)
        try:
            self._sender.sendto(payload, target)
        except BlockingIOError:
            pass  # its queue is full: it has wake-ups to read already
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(target)  # no socket bound there: its process ended without removing it
                os.rmdir(self.folder)  # if it was the last one
        except OSError as exc:
            logger.debug("ringing %s failed: %s", target, exc)


def _app_of(datagram: bytes) -> str:
    try:
        return datagram.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return ""  # not from keel: wake every app rather than guess


def _make_private_folder(folder: Path) -> None:
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    _check_private(folder)


def _check_private(folder: Path) -> None:
    """Raise unless ``folder`` is a real folder (no symlink) of this user that nobody else may enter."""
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"{folder} is not a folder")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to user id {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise PermissionError(f"{folder} may be entered by other users (mode {stat.S_IMODE(info.st_mode):o})")

"""The write lock keel processes on one file hand to each other in the kernel, not by polling SQLite's.

Why: SQLite's write lock cannot be waited for. A writer that finds it taken gets ``SQLITE_BUSY`` and must try again
later, so a process waiting for another's transaction either sleeps too long (the lock came free meanwhile and sat
idle) or spins; with two worker processes on one file, each commit made the other one wait by a pause, and two
processes did less than one. So before ``BEGIN IMMEDIATE`` a keel writer takes an exclusive ``flock`` on a file next to
the database (``location.lock_path``): a writer that finds it taken sleeps in the kernel and is woken the moment the
holder lets go, after its ``COMMIT``. SQLite's own lock is still taken inside, so processes that do not know this
file (an older keel, the ``sqlite3`` shell) stay safe, and are waited for by short pauses as before.

- A crashed holder cannot leave it taken: the kernel drops a process's ``flock`` locks when it dies.
- A stopped holder (``SIGSTOP``) keeps it, as it keeps SQLite's; a waiter gives up after the busy timeout, as it would
  on SQLite's lock. The waiting is done by a helper thread, so that the database thread can stop waiting on time
  (a blocking ``flock`` cannot be given a timeout or interrupted from Python); an uncontended lock is taken on the
  database thread itself, with one system call.
- A lock file that cannot be opened (a read-only folder) leaves SQLite's lock alone to serialise writers (one warning).
- ``memory://`` has no file and one connection per process: it takes no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)


class WriteLock:
    """An exclusive ``flock`` on one lock file, taken around each write transaction of one connection.

    Used from the database thread only (``acquire`` then ``release``); the helper thread it starts does the blocking
    waits.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._unusable = False
        self._held = False
        self._closed = False
        self._cond = threading.Condition()
        #: The helper thread is (or is about to be) blocked in ``flock`` for this process.
        self._requested = False
        #: The database thread waits for the helper's grant.
        self._wanted = False
        #: The helper got the lock for the database thread.
        self._granted = False
        self._helper: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True between an ``acquire`` that took the lock and the next ``release``."""
        return self._held

    def acquire(self, timeout_s: float) -> bool:
        """Take the lock, waiting up to ``timeout_s`` for another process to release it.

        Returns:
            True once held, or at once if the lock file cannot be used (then SQLite's lock alone serialises writers);
            False if another process held it for the whole ``timeout_s``.
        """
        fd = self._open()
        if fd is None:
            return True
        with self._cond:
            if not self._requested:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._request()
                else:
                    self._held = True
                    return True
            # One request at a time: the helper's, still outstanding if an earlier wait gave up on it.
            self._wanted = True
            try:
                answered = self._cond.wait_for(lambda: self._granted or self._unusable, timeout_s)
            finally:
                self._wanted = False
            if not answered:
                return False
            if not self._granted:
                return True  # the wait failed: SQLite's lock alone, as without a lock file
            self._granted = False
            self._held = True
            return True

    def release(self) -> None:
        """Let the next writer in; nothing if the lock is not held."""
        if self._held:
            self._held = False
            assert self._fd is not None
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release the lock and close the file; a helper still waiting closes it once its wait ends. Safe twice."""
        self.release()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if not self._requested and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _open(self) -> int | None:
        if self._fd is not None or self._unusable or self._closed:
            return self._fd
        try:
            # Read-only is enough for flock, so every user who may read the file may take part.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            self._unusable = True
            logger.warning(
                "cannot use the lock file %s (%s): writers to this SQLite file will wait for each other by polling",
                self.path,
                exc,
                extra={"lock_file": str(self.path)},
            )
        return self._fd

    def _request(self) -> None:
        """Have the helper thread wait for the lock (under ``_cond``)."""
        self._requested = True
        if self._helper is None:
            self._helper = threading.Thread(target=self._wait_for_lock, name=f"keel-lock:{self.path.name}", daemon=True)
            self._helper.start()
        self._cond.notify_all()

    def _wait_for_lock(self) -> None:
        """The helper thread: block in ``flock`` whenever asked, then hand the lock over or let it go."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested or self._closed)
                if self._closed:
                    self._close_file()
                    return
                fd = self._fd
            assert fd is not None
            error: OSError | None = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # sleeps in the kernel until the holder lets go (or dies)
            except OSError as exc:  # not seen in practice: a waiter then falls back to SQLite's lock
                error = exc
            with self._cond:
                self._requested = False
                if self._closed:
                    self._close_file()  # which releases the lock, if this wait took it
                    return
                if error is not None:
                    self._give_up(error)
                elif self._wanted:
                    self._granted = True
                else:  # the waiter gave up meanwhile: nobody wants it now
                    fcntl.flock(fd, fcntl.LOCK_UN)
                self._cond.notify_all()

    def _give_up(self, error: OSError) -> None:
        logger.warning("waiting for the lock file %s failed (%s): falling back to polling", self.path, error)
        self._unusable = True
        self._close_file()

    def _close_file(self) -> None:
        self._requested = False
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

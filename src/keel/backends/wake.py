"""The wake gate: the per-app waiters of ``wait_for_work`` and the wake rule, written once for every engine.

The rule (``base.Claimer``): a wait returns at once for work announced since the later of its backend's last
claim of the app began and its last wait for the app returned; otherwise it parks until an announcement that
concerns the workflows its backend claims, or until its timeout. It never spins on work announced before that.

Each engine supplies only its transport, the way it hears of work, and tells its gate what it heard:

- SQLite: its own writes, the doorbell datagrams of other processes on the file, and a poll of the file
  (``poll``) for what neither announces (a lost datagram, a timer coming due).
- PostgreSQL: a pump reading LISTEN/NOTIFY on a connection of its own; every waiter re-polls after a reconnect.
- Redis: a pump per app blocking on the app's wake stream.

What the engine calls:

- ``claiming(app, workflows)`` as a claim starts: announcements before it no longer count, and waits wake only
  for announcements about the workflows claimed so far (any announcement, before the first claim);
- ``wake(app, workflow)`` for each announcement its transport heard (``workflow`` None: every workflow);
- ``announce(app)`` after its own write made work visible: that wakes this gate and every gate of a backend on
  the same database in this process (``neighbours``), without a round trip through the transport; several
  backends on one SQLite file, or on one in-memory database, wake each other at once;
- ``wake_all()`` when announcements may have been lost (the transport reconnected), ``fail_all(exc)`` when
  waiters must hear of an error, ``close()`` when the backend closes.

Announcements are numbered by one counter per gate (the epoch): a claim notes the epoch it started at, each
announcement the epoch it came at, per workflow, so "since the claim" is one comparison, whatever the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING

from keel.errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

#: The key of an announcement about every workflow of an app.
_ANY = ""

#: The gates of this process by the database their backends share (``neighbours``): an announcement wakes them all.
_NEIGHBOURS: dict[str, weakref.WeakSet[WakeGate]] = {}


class WakeGate:
    """The waiters of one backend, per app, and what they were told since that backend's last claim.

    Args:
        url: The backend's URL (password masked), for the error a closed gate raises.
        neighbours: A name for the database the backend uses, the same for every backend of this process on it;
            ``announce`` wakes them all. None: announcements wake this gate only.
    """

    def __init__(self, url: str, *, neighbours: str | None = None) -> None:
        self.url = url
        self._waiters: dict[str, dict[asyncio.Future[None], frozenset[str] | None]] = {}
        #: app -> the workflows claimed so far (None before the first claim), and the epoch waits count from.
        self._since: dict[str, tuple[frozenset[str] | None, int]] = {}
        #: app -> workflow (or ``_ANY``) -> the epoch of the last announcement about it.
        self._heard: dict[str, dict[str, int]] = {}
        self._epoch = 0
        self._closed = False
        self._group = None if neighbours is None else _NEIGHBOURS.setdefault(neighbours, weakref.WeakSet())
        if self._group is not None:
            self._group.add(self)

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def claiming(self, app: str, workflows: Collection[str]) -> None:
        """Note that a claim of ``app``'s ``workflows`` starts now: the next wait counts from here."""
        known, _ = self._since.get(app, (None, 0))
        self._since[app] = ((known or frozenset()) | frozenset(workflows), self._epoch)

    def waiting(self, app: str) -> bool:
        """True while a wait for ``app`` is parked here."""
        return any(not waiter.done() for waiter in self._waiters.get(app, {}))

    def waiting_apps(self) -> list[str]:
        """The apps that waits are parked for."""
        return [app for app in self._waiters if self.waiting(app)]

    def wake(self, app: str, workflow: str | None = None) -> None:
        """Record an announcement of work for ``app`` (about ``workflow``, or every one) and wake who it concerns."""
        self._epoch += 1
        self._heard.setdefault(app, {})[workflow or _ANY] = self._epoch
        for waiter, workflows in self._waiters.get(app, {}).items():
            if workflows is None or not workflow or workflow in workflows:
                settle(waiter, None)

    def announce(self, app: str) -> None:
        """Wake this gate and its neighbours' for ``app``: a write of this process made work visible."""
        for gate in list(self._group) if self._group is not None else [self]:
            gate.wake(app)

    def wake_all(self) -> None:
        """Wake every waiter, as an announcement about every workflow of every app they wait for."""
        for app in list(self._waiters):
            self.wake(app)

    def fail_all(self, exc: BaseException) -> None:
        """End every parked wait with ``exc``."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                settle(waiter, exc)

    def close(self) -> None:
        """Refuse new waits and let the parked ones return. Safe to call twice."""
        self._closed = True
        if self._group is not None:
            self._group.discard(self)
        self.wake_all()

    async def wait(
        self,
        app: str,
        *,
        timeout_s: float,
        listen: Callable[[], object] | None = None,
        poll: Callable[[], Awaitable[bool]] | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        """Return by the wake rule, or after ``timeout_s`` at the latest.

        Args:
            app: The app to wait for.
            timeout_s: The longest wait; it also bounds a ``poll`` that takes long.
            listen: Called once the waiter is parked, before the first poll: the transport starts hearing now.
            poll: Looks for work the transport may not announce; True ends the wait. Called once before parking
                and then every ``poll_interval_s``.
            poll_interval_s: How often to poll while parked (None: only once, before parking).

        Raises:
            BackendUnavailable: The gate is closed, or the transport failed (``fail_all``), or a poll did.
        """
        if self._closed:
            raise BackendUnavailable(self.url, "the backend is closed", hint="open a new one")
        workflows, since = self._since.get(app, (None, -1))
        if since >= 0 and self._heard_since(app, workflows, since):
            self._returned(app)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(app, {})[waiter] = workflows
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    if listen is not None:
                        listen()
                    await self._parked(waiter, poll, poll_interval_s)
        finally:
            self._waiters[app].pop(waiter, None)
            waiter.cancel()
            self._returned(app)

    async def _parked(
        self,
        waiter: asyncio.Future[None],
        poll: Callable[[], Awaitable[bool]] | None,
        interval_s: float | None,
    ) -> None:
        if poll is not None and await poll():
            return
        while True:
            await asyncio.wait((waiter,), timeout=interval_s if poll is not None else None)
            if waiter.done():
                waiter.result()  # raises what fail_all gave it
                return
            if poll is not None and await poll():
                return

    def _heard_since(self, app: str, workflows: frozenset[str] | None, since: int) -> bool:
        heard = self._heard.get(app, {})
        if workflows is None:
            return any(epoch > since for epoch in heard.values())
        return any(heard.get(name, 0) > since for name in (*workflows, _ANY))

    def _returned(self, app: str) -> None:
        """A wait ended: what was announced until now no longer makes the next one return at once."""
        workflows, _ = self._since.get(app, (None, 0))
        self._since[app] = (workflows, self._epoch)


def settle(waiter: asyncio.Future[None], exc: BaseException | None) -> None:
    """Resolve ``waiter`` (an exception: raise it there) from any thread: a neighbour may live on another event loop."""
    loop = waiter.get_loop()
    if loop.is_closed():
        return

    def resolve() -> None:
        if waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        resolve()
    else:
        with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(resolve)

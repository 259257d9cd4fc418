"""Waiting for messages to end: the waiters of ``Reader.wait_for_end`` and the rule that none misses an end.

A message ends when its status becomes final: done (its turn committed), failed (dead-lettered) or skipped. Each
engine announces an end as part of the write that makes it, and tells its ``EndWaiters`` what it hears:

- SQLite (and ``memory://``): ``announce`` after its own commit, which wakes the waiters of every backend of this
  process on the same database at once (``neighbours``), and a datagram to the processes waiting on the file.
- PostgreSQL: a NOTIFY in the commit's own transaction, for the messages a client marked as waited for, heard on
  the backend's one LISTEN connection.
- Redis: a PUBLISH from the commit's script, heard on the backend's one pub/sub connection.

The rule, written here once (``wait``), is what makes a wake-up impossible to miss:

1. the wait registers itself, and has its transport start hearing of the app (``listen``), before it first reads
   the status, so an end announced after that read wakes it;
2. it reads the status (``check``): an end committed before the wait began returns at once;
3. it parks until it hears of its message (``heard``), or its transport asks every waiter to read again
   (``recheck``: a LISTEN or SUBSCRIBE has just taken effect, the connection came back, a datagram was garbled), or
   ``recheck_s`` passes (the safety net: a lost datagram, a process of an older keel that announces nothing), or
   the timeout; then it reads again.

An engine that must be told which messages are waited for (PostgreSQL marks their rows) does so with the reads that
``check`` is asked to ``mark``: the first one, and the first after each ``recheck``, which is when a transport may
have lost what the engine was told (the server restarted under it). The reads after an end was heard, or after
``recheck_s`` with nothing heard, only read: the mark made before still stands.

Every wait of one backend shares its transport: registering a hundred waits costs a hundred dictionary entries,
and one listener hears for all of them.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

from keel.backends.base import MessageStatus
from keel.backends.wake import settle
from keel.errors import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from keel.backends.base import MessageInfo

#: The waiters of this process by the database their backends share (``neighbours``): an announcement reaches all.
_NEIGHBOURS: dict[str, weakref.WeakSet[EndWaiters]] = {}


class _Waiter:
    """One parked wait: a future that whoever hears of its message settles, renewed after each wake-up."""

    __slots__ = ("future", "loop", "rechecked")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        #: A ``recheck`` came since the last read: the next one marks again.
        self.rechecked = False

    def rearm(self) -> bool:
        """Renew the future for the next park; return whether the read that follows must mark (a recheck came)."""
        if self.future.done():
            self.future = self.loop.create_future()
        rechecked, self.rechecked = self.rechecked, False
        return rechecked


class EndWaiters:
    """The waits of one backend for messages to end, by app and message id.

    Args:
        url: The backend's URL (password masked), for the error a closed backend raises.
        recheck_s: The longest a parked wait goes without reading its message's status again.
        neighbours: A name for the database the backend uses, the same for every backend of this process on it;
            ``announce`` wakes them all. None: announcements wake these waiters only.
    """

    def __init__(self, url: str, *, recheck_s: float, neighbours: str | None = None) -> None:
        self.url = url
        self.recheck_s = recheck_s
        self._waiters: dict[tuple[str, str], set[_Waiter]] = {}
        self._closed = False
        self._group = None if neighbours is None else _NEIGHBOURS.setdefault(neighbours, weakref.WeakSet())
        if self._group is not None:
            self._group.add(self)

    def apps(self) -> set[str]:
        """The apps that waits are parked for."""
        return {app for app, _ in list(self._waiters)}

    def heard(self, app: str, message_id: str) -> None:
        """The transport heard that ``message_id`` of ``app`` ended: wake its waits to read its status."""
        for waiter in list(self._waiters.get((app, message_id), ())):
            settle(waiter.future, None)

    def announce(self, app: str, message_ids: Iterable[str]) -> None:
        """A write of this process ended ``message_ids``: wake their waits here and on every neighbour."""
        ended = list(message_ids)
        for waiters in list(self._group) if self._group is not None else [self]:
            for message_id in ended:
                waiters.heard(app, message_id)

    def recheck(self, app: str | None = None) -> None:
        """Have every wait for ``app`` (None: for any app) read its status again: ends may have gone unheard."""
        for (waited_app, _), waiters in list(self._waiters.items()):
            if app is None or waited_app == app:
                for waiter in list(waiters):
                    waiter.rechecked = True
                    settle(waiter.future, None)

    def close(self) -> None:
        """Refuse new waits and end the parked ones with ``BackendUnavailable``. Safe to call twice."""
        self._closed = True
        if self._group is not None:
            self._group.discard(self)
        self.recheck()

    async def wait(
        self,
        app: str,
        message_id: str,
        *,
        timeout_s: float,
        check: Callable[[bool], Awaitable[MessageInfo | None]],
        listen: Callable[[], object] | None = None,
    ) -> MessageInfo | None:
        """Return the message's status once it has ended, or is gone, or at the timeout (then still pending).

        Args:
            app: The message's app.
            message_id: The message.
            timeout_s: The longest wait; the status is read at least once, however small it is.
            check: Reads the status (None: no such message); when its argument (``mark``) is true, the engine also
                registers its interest in the message's end with that read, if it needs to (see above).
            listen: Called before every read: has the transport hear of ``app`` (idempotent, never blocks).

        Raises:
            BackendUnavailable: The backend is closed, or a read failed.
        """
        self._refuse_if_closed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        key = (app, message_id)
        waiter = _Waiter(loop)
        self._waiters.setdefault(key, set()).add(waiter)
        mark = True
        try:
            while True:
                if listen is not None:
                    listen()
                info = await check(mark)
                remaining = deadline - loop.time()
                if info is None or info.status is not MessageStatus.pending or remaining <= 0:
                    return info
                await asyncio.wait((waiter.future,), timeout=min(self.recheck_s, remaining))
                self._refuse_if_closed()
                mark = waiter.rearm()  # before the read: an end or recheck announced from here on wakes the next park
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise BackendUnavailable(self.url, "the backend is closed", hint="open a new one")

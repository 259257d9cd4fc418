"""How a worker reports an overloaded backend: once when the overload starts, once when it eases.

``BackendOverloaded`` means the backend answers but a call waited past its bound for a connection: load, not an
outage. The worker backs off and goes on; under load every call may say so, and a line per call would bury the
log, so the first says it at WARNING and the rest at DEBUG until a call goes through again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

    from keel.errors import BackendOverloaded


class LoadNotice:
    """Logs one worker's overload episodes: their start, then their end with how many calls were refused."""

    def __init__(self, logger: logging.Logger, worker: str) -> None:
        self._logger = logger
        self._extra: dict[str, Any] = {"worker": worker}
        self._refused = 0

    def overloaded(self, what: str, error: BackendOverloaded) -> None:
        """Say that ``what`` (e.g. "claiming") was refused by an overloaded backend: at WARNING the first time."""
        self._refused += 1
        if self._refused > 1:
            self._logger.debug("%s refused, the backend is overloaded: %s", what, error, extra=self._extra)
            return
        self._logger.warning(
            "%s refused, the backend is overloaded: %s; backing off and going on (further refusals are logged at "
            "DEBUG until calls go through again)",
            what,
            error,
            extra=self._extra,
        )

    def eased(self) -> None:
        """Say that a call went through again, if an overload was reported."""
        if self._refused:
            self._logger.info(
                "the backend keeps up again, after %d call(s) refused for overload", self._refused, extra=self._extra
            )
            self._refused = 0

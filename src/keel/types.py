"""Value types that cross the public API: plain pydantic models, no I/O."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Versioned(BaseModel, Generic[T]):
    """One version of a stored value.

    Attributes:
        value: The value as stored: JSON types, or an instance of the model asked for.
        version: The version number; it grows by one with every write and is never reused for a key.
        written_at: When the version was written, by the backend's clock where it has one (UTC).
        writer: Who wrote it, as ``host:pid``.
        deleted: True only for a tombstone in ``history()``: the key was deleted at this version.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    value: T
    version: int
    written_at: datetime
    writer: str
    deleted: bool = False

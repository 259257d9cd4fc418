"""Checks and encodings at the edge: keys, JSON documents, size limits, pydantic models.

Every value keel stores is a JSON document. Encoding happens before anything touches a backend, so a
value that is not JSON, too large, or under a bad key is refused without a write.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from keel.errors import InvalidKeyError, NotSerializableError, PayloadTooLargeError, PayloadValidationError

#: The longest key, in characters.
MAX_KEY_CHARS = 255

#: The default limit on one value's JSON encoding, in bytes (1 MiB).
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024

ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_key(key: object, *, what: str = "key") -> str:
    """Return ``key`` if it is a usable key, else raise.

    Raises:
        InvalidKeyError: Not a string, empty, over 255 characters, or holding a character that is not printable.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(key, f"a {what} must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, f"a {what} must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidKeyError(key, f"a {what} is at most {MAX_KEY_CHARS} characters; this one has {len(key)}")
    if not key.isprintable():
        bad = next(ch for ch in key if not ch.isprintable())
        raise InvalidKeyError(key, f"a {what} must be printable; it holds {bad!r}")
    return key


def encode(value: object, *, what: str, max_bytes: int) -> str:
    """Encode ``value`` (JSON types or a pydantic model) as compact JSON text.

    Raises:
        NotSerializableError: The value is not a JSON document (an object, NaN, a set...).
        PayloadTooLargeError: The encoding is over ``max_bytes``.
    """
    if isinstance(value, BaseModel):
        try:
            text = value.model_dump_json()
        except (TypeError, ValueError) as exc:
            raise NotSerializableError(what, str(exc)) from exc
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise NotSerializableError(what, str(exc)) from exc
    # Most values are far below the limit; only count bytes when the character count could exceed it.
    if len(text) * 4 > max_bytes:
        size = len(text.encode())
        if size > max_bytes:
            raise PayloadTooLargeError(what, size, max_bytes)
    return text


def decode(text: str, model: type[ModelT] | None = None, *, what: str = "stored value") -> Any:
    """Decode JSON text, into ``model`` when one is given.

    Raises:
        PayloadValidationError: The document does not fit ``model``.
    """
    if model is None:
        return json.loads(text)
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise PayloadValidationError(what, model.__name__, exc.errors(include_url=False)) from exc


def coerce(value: object, model: type[ModelT], *, what: str) -> ModelT:
    """Return ``value`` as an instance of ``model``, validating plain data.

    Raises:
        PayloadValidationError: The value does not fit ``model``.
    """
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise PayloadValidationError(what, model.__name__, exc.errors(include_url=False)) from exc

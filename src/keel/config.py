"""Where keel reads its configuration from the environment: this module and nowhere else."""

from __future__ import annotations

import os

#: The backend used when neither an explicit URL nor ``KEEL_URL`` is given.
DEFAULT_URL = "sqlite:///keel.db"

#: The environment variable naming the backend URL.
URL_VARIABLE = "KEEL_URL"


def resolve_url(url: str | None = None) -> str:
    """Pick the backend URL.

    Precedence: the explicit ``url`` argument, else the ``KEEL_URL`` environment variable, else
    ``sqlite:///keel.db`` (a file in the current folder, resolved to an absolute path and logged when opened).

    Args:
        url: An explicit URL, or None to fall back.

    Returns:
        The URL to open.
    """
    if url:
        return url
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL

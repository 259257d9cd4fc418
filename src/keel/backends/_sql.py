"""SQL kept as data: named queries parsed from ``.sql`` files shipped in the package.

A file holds queries separated by header lines ``-- name --``; the line after a header is a comment
saying what the query does. Statements in ``schema.sql`` are separated by blank-line-free ``;`` ends.
"""

from __future__ import annotations

import re
from importlib import resources

_HEADER = re.compile(r"^-- ([a-z_][a-z0-9_]*) --$", re.MULTILINE)


def load_queries(package: str, filename: str) -> dict[str, str]:
    """Return ``{name: sql}`` for every ``-- name --`` section of ``package/filename``."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    # split() with a capturing group alternates: the preamble, then each name followed by its body.
    queries = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not queries:
        raise RuntimeError(f"{package}/{filename} holds no '-- name --' sections")
    return queries


def load_script(package: str, filename: str) -> str:
    """Return the whole text of ``package/filename``."""
    return resources.files(package).joinpath(filename).read_text(encoding="utf-8")

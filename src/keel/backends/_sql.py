"""SQL kept as data: named statements in ``.sql`` files shipped with each engine, parsed once at import.

A file is a series of sections::

    -- get --
    -- The live version of a key.
    SELECT ...

The header line names the statement, the comment line under it says what it does, and the SQL runs to the
next header. Comment lines before the first header describe the file.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

_HEADER = re.compile(r"^-- ([a-z][a-z0-9_]*) --$", re.MULTILINE)


def parse(text: str) -> dict[str, LiteralString]:
    """Return the statements of one ``.sql`` file by name, in file order.

    Raises:
        ValueError: A section has no description line or no SQL, or a name appears twice.
    """
    parts = _HEADER.split(text)
    statements: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        description, _, sql = body.strip().partition("\n")
        if not description.startswith("-- ") or not sql.strip():
            raise ValueError(f"SQL section {name!r} needs a '-- description' line followed by a statement")
        if name in statements:
            raise ValueError(f"SQL section {name!r} appears twice")
        # The text comes from keel's own data files, never from input: as safe as a literal in the code.
        statements[name] = cast("LiteralString", sql.strip())
    if not statements:
        raise ValueError("no '-- name --' sections found")
    return statements


def load_queries(package: str, filename: str) -> dict[str, LiteralString]:
    """Parse the ``.sql`` file ``filename`` shipped in ``package``."""
    return parse(load_script(package, filename))


def load_script(package: str, filename: str) -> str:
    """Return the whole text of ``package/filename``."""
    return resources.files(package).joinpath(filename).read_text(encoding="utf-8")

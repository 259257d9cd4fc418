"""The PostgreSQL engine: ``postgresql://...`` URLs, for state shared by many machines.

``store.py`` holds the engine and documents its URL parameters; the SQL lives in ``schema.sql`` (the tables, one
section per migration step) and ``queries.sql`` (every statement the engine runs), parsed by ``keel.backends._sql``.
"""

from __future__ import annotations

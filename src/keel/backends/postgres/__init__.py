"""The PostgreSQL engine: ``postgresql://...`` URLs, for state shared by many machines.

The same skeleton as every engine package:

- ``connection.py``: settings from the URL (documented there), the pool, the one boundary where driver errors
  become ``BackendUnavailable``; ``migrate.py``: the tables, created and upgraded on open.
- ``store.py``: the versioned store; ``broker.py``: the broker's roles (inboxes, leases, turn commits, event log),
  with ``transactions.py`` the writes that share one transaction (sends, events, commits) and the order they lock
  instances in; ``wake.py``: the wake transport (LISTEN/NOTIFY on a connection of its own, feeding the backend's
  ``keel.backends.wake.WakeGate``); ``rows.py``: rows decoded into the contract's row types.
- ``backend.py``: the entry points, ``open_engine`` and ``open_backend`` (store and broker composed over one pool).
- SQL as data: ``schema.sql`` (the tables, one section per migration step), ``queries.sql`` (the store's and the
  schema bookkeeping's statements) and ``broker.sql`` (the broker's), parsed by ``keel.backends._sql``.
"""

from __future__ import annotations

"""The embedded SQLite engine: one file, several processes on one machine; ``memory://`` runs on it too.

The same skeleton as every engine package:

- ``connection.py``: opening the file from the URL (options documented there), one connection on a thread of its
  own (``thread.py``) with group commit (``writes.py``), the one boundary where sqlite3's errors become
  ``BackendUnavailable``; ``location.py``: where the file is, and refusing network filesystems; ``migrate.py``:
  the schema, created and upgraded on open.
- ``store.py``: the versioned store; ``broker.py``: the broker's roles (inboxes, leases, turn commits, event log),
  with ``transactions.py`` each write as one function of the connection; ``wake.py``: the wake transport (a
  datagram doorbell per waiting backend and a poll of the file, feeding the backend's
  ``keel.backends.wake.WakeGate``); ``rows.py``: rows decoded into the contract's row types, and times.
- ``backend.py``: the entry points, ``open_engine`` and ``open_backend`` (store and broker composed over one
  connection); ``memory.py``: the same for ``memory://``, on one in-memory connection per name in the process.
- SQL as data: ``schema.sql`` (the tables, one section per migration step), ``queries.sql`` (the store's and the
  schema bookkeeping's statements), ``runtime.sql`` (the broker's), parsed by ``keel.backends._sql``.
"""

"""The Redis engine: ``redis://`` and ``rediss://`` URLs, needing the ``redis`` extra.

The same skeleton as every engine package:

- ``connection.py``: the client from the URL (documented there), the checks at connect (persistence, schema), the
  one boundary where redis-py's errors become ``BackendUnavailable``; ``migrate.py``: upgrades of older layouts.
- ``store.py``: the versioned store; ``broker.py``: the broker's roles (inboxes, leases, turn commits, event log),
  with ``outbox.py`` (the sends and events a script appends), ``cleanup.py`` (pruning and deleting) and ``keys.py``
  (the key layout); ``wake.py``: the wake transport (blocking reads of the apps' wake streams, feeding the
  backend's ``keel.backends.wake.WakeGate``); ``rows.py``: replies decoded into the contract's row types.
- ``backend.py``: the entry points, ``open_engine`` and ``open_backend`` (store and broker on one connection).
- Lua as data: ``scripts/`` (read by ``lua.py``), one script per atomic operation.

Nothing is imported here, so importing the package does not need redis-py.
"""

"""The PostgreSQL engine: ``postgresql://...`` URLs, for state shared by many machines.

``store.py`` holds the store and documents its URL parameters; ``broker.py`` the runtime's inboxes, leases, turn
commits and event log over the store's pool, with ``transactions.py`` the writes that share one transaction (sends,
events, commits) and the order they lock instances in; ``listener.py`` the LISTEN/NOTIFY wake-ups on a connection
of their own; ``backend.py`` joins the three. The SQL lives in ``schema.sql`` (the tables, one section per migration
step), ``queries.sql`` (the store's statements) and ``broker.sql`` (the broker's), parsed by ``keel.backends._sql``.
"""

from __future__ import annotations

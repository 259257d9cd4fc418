"""The Redis engine: ``redis://`` and ``rediss://`` URLs, needing the ``redis`` extra.

``store.py`` holds the engine, ``keys.py`` the key layout, ``scripts/`` the Lua that makes writes atomic.
Nothing is imported here, so importing the package does not need redis-py.
"""

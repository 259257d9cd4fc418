"""bench.peers: keel against DBOS and LangGraph, side by side (``python -m bench.peers``; see ``__main__.py``)."""

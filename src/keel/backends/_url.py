"""Reading and masking backend URLs."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit


def scheme_of(url: str) -> str:
    """Return the URL's scheme, lower-cased, without a driver suffix (``postgresql+psycopg`` -> ``postgresql``)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return scheme.lower().split("+", 1)[0]


def mask_password(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, safe to log and to show in errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{user}:***@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def query_options(url: str) -> dict[str, str]:
    """Return the URL's query parameters as a dict (last one wins)."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))

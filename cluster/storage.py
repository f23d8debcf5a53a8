"""Storage URIs as every process of a cluster sees them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["absolute_sqlite_uri"]

SQLITE_PREFIX = "sqlite:///"


def absolute_sqlite_uri(uri: str, key: str = "uri") -> str:
    """A SQLite URI with an absolute path (its folder created); any other URI unchanged.

    Ray workers and Serve replicas may run in another directory than the driver, so a relative
    `sqlite:///.raylift/x.db` would name a different (empty) database in each of them; an
    in-memory database is private to one process, so it is refused with the key to fix.
    """
    if not uri.startswith("sqlite:"):
        return uri  # a database server (postgresql://...): nothing local to resolve
    path, sep, query = uri.removeprefix(SQLITE_PREFIX).partition("?")
    if not uri.startswith(SQLITE_PREFIX) or path in ("", ":memory:"):
        raise ValueError(
            f"{key}={uri!r} is an in-memory SQLite database, which every Ray worker "
            "would see empty; use a file, e.g. sqlite:///.raylift/state.db"
        )
    absolute = Path(path).expanduser().resolve()
    absolute.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{absolute}{sep}{query}"

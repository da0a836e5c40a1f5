"""Object storage behind one Protocol: a local folder (embedded default) or S3.

A layer below the whole broker: it imports nothing from `broker`. Keys are opaque strings here;
the index decides their layout (`broker.index.keys`). A store that cannot be reached raises
`StoreUnavailable`, which the broker answers as 503 / DIMSE out-of-resources.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlparse

from storage.base import ObjectInfo, ObjectNotFound, ObjectStore, StoreUnavailable
from storage.local import LocalStore

__all__ = ["ObjectInfo", "ObjectNotFound", "ObjectStore", "LocalStore", "StoreUnavailable", "open_store"]


def open_store(url: str, *, local_sync: str = "fsync") -> ObjectStore:
    """`file:///path[?sync=fsync|syncfs]` (default `local_sync`: see LocalStore) or
    `s3://bucket[/prefix]?endpoint_url=...&region=...` (also
    `connect_timeout`, `read_timeout` in seconds and `retries`: see storage.s3)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        if not parsed.scheme:
            return LocalStore(url, sync=local_sync)
        q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return LocalStore(unquote(parsed.path), sync=q.get("sync", local_sync))
    if parsed.scheme == "s3":
        # Only an S3 store needs boto3 (and its import costs ~0.3 s): loaded when one is asked for.
        from storage import s3

        q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        try:
            connect_timeout = float(q.get("connect_timeout", s3.DEFAULT_CONNECT_TIMEOUT))
            read_timeout = float(q.get("read_timeout", s3.DEFAULT_READ_TIMEOUT))
            retries = int(q.get("retries", s3.DEFAULT_RETRIES))
        except ValueError:
            raise ValueError(
                "storage URL: connect_timeout and read_timeout must be seconds, retries a whole number"
            ) from None
        return s3.S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=q.get("endpoint_url"),
            region=q.get("region"),
            create_bucket=q.get("create_bucket", "false").lower() in ("1", "true", "yes"),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=retries,
        )
    raise ValueError(f"unsupported storage URL scheme: {parsed.scheme!r}")

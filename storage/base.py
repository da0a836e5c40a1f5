"""The object store contract shared by every backend (local folder, S3)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable


class StoreUnavailable(Exception):
    """The object store cannot be reached or failed to answer (a network or service fault, not a
    missing object). The message names no object content, only the operation and the fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    # When the object was last written (POSIX seconds), where head() and list() know it.
    modified: float | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Streamed put, streamed and ranged get, head, delete, list.

    Every method blocks (file and network I/O): async callers run them in a thread.
    `put` is atomic: a reader sees the whole object or none of it.
    """

    url: str

    def put(self, key: str, data: BinaryIO, *, size: int | None = None) -> ObjectInfo: ...

    def put_file(self, key: str, path: str, *, move: bool = False) -> ObjectInfo:
        """Store a local file. `move=True` hands the file over: a backend on the same
        filesystem may link it into place instead of copying (the caller must not modify it
        afterwards, only remove it)."""
        ...

    def get(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Yield the bytes [start, end) of the object; end None means to its end."""
        ...

    def open_local(self, key: str) -> str | None:
        """A local file path for the object if the backend has one (fast path), else None."""
        ...

    def head(self, key: str) -> ObjectInfo: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str = "") -> Iterable[ObjectInfo]: ...

"""Received files hashed as they are written: each received byte is read once.

A STOW-RS part and a C-STORE spool file are written through `HashingWriter`, which computes the
SHA-256 (the object's content address) and size on the way to disk and can keep a small file's
bytes; ingest takes the resulting `Received` and never reads the file again to hash it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Received:
    """A received file whose SHA-256 and size were computed while it was written (the STOW-RS
    part, the C-STORE spool file), so ingest never reads it again to hash it; `data` holds its
    bytes when the receiver kept them (small files), so parsing need not open it either."""

    path: str
    sha256: str
    size: int
    data: bytes | None = None


class HashingWriter:
    """Wraps a binary file open for writing: every byte written also goes into a SHA-256 and
    a byte count, and up to `keep` bytes are kept in memory (a small file is then parsed from
    memory). The receivers write through it, so the hash costs no second read."""

    def __init__(self, raw: Any, *, keep: int = 0) -> None:
        self.raw = raw
        self._hash = hashlib.sha256()
        self.size = 0
        self._keep = keep
        self._kept: list[bytes] | None = [] if keep > 0 else None

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._kept is not None:
            if self.size <= self._keep:
                self._kept.append(bytes(data))
            else:
                self._kept = None  # too big to keep: parsed from the file
        return int(self.raw.write(data))

    def __getattr__(self, name: str) -> Any:
        # name, file, flush, close ... as the wrapped file has them.
        return getattr(self.raw, name)

    def received(self, path: str | None = None) -> Received:
        kept = b"".join(self._kept) if self._kept is not None else None
        return Received(path or str(self.raw.name), self._hash.hexdigest(), self.size, kept)

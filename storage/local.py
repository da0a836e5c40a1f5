"""Local-folder object store: the embedded default."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO, cast

from storage.base import ObjectInfo, ObjectNotFound


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_POOL: ThreadPoolExecutor | None = None


_SYNC_THREADS = 8


def _sync_slice(fsync: Callable[[Any], None], targets: Sequence[Any]) -> None:
    for target in targets:
        fsync(target)


def _sync_all(fsync: Callable[[Any], None], targets: Iterable[Any]) -> None:
    """`fsync` each target side by side (fsync releases the GIL, and the filesystem's journal
    commits concurrent ones together): a group waits about one fsync per thread's share, not
    one per target. At most `_SYNC_THREADS` slices of the targets, the caller doing one: a STOW-RS
    batch of 100 objects is 7 thread hops, not 100 (each hop costs the GIL a wake-up)."""
    global _SYNC_POOL
    todo = list(targets)
    if len(todo) <= 1:
        _sync_slice(fsync, todo)
        return
    if _SYNC_POOL is None:
        _SYNC_POOL = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="scanonce-fsync")
    ways = min(_SYNC_THREADS, len(todo))
    # The calling thread takes the first slice itself: one hand-off fewer, and it would only
    # have waited meanwhile.
    futures = [_SYNC_POOL.submit(_sync_slice, fsync, todo[i::ways]) for i in range(1, ways)]
    try:
        _sync_slice(fsync, todo[0::ways])
    finally:
        wait(futures)  # a failure here still returns only once the pool's slices are done
    for future in futures:
        future.result()


SYNC_MODES = ("fsync", "syncfs")


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2) from the C library (Python's os has no binding), or None elsewhere.
    A ctypes call releases the GIL for its duration, as os.fsync does."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)


class LocalStore:
    def __init__(self, root: str | Path, *, sync: str = "fsync") -> None:
        """`sync`: how `put_files` makes a group durable. "fsync": each object and each directory
        that gained an entry, side by side on a small pool. "syncfs": the whole filesystem holding
        the folder twice per group (the objects' bytes before their names appear, then the
        names), in the calling thread: no pool hand-offs, but every other writer's dirty data on
        that filesystem is written back too. Falls back to "fsync" where syncfs(2) is missing."""
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        self.root = Path(root).resolve()
        self._root_text = str(self.root)
        self._root_prefix = os.path.join(self._root_text, "")
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._syncfs = _load_syncfs() if sync == "syncfs" else None
        self.sync = "syncfs" if self._syncfs is not None else "fsync"
        self._dev = os.stat(self.root).st_dev

    def _sync_filesystem(self) -> None:
        """syncfs(2) on the folder's filesystem; an error (EIO from writeback, Linux >= 5.8)
        raises as a failed fsync would."""
        assert self._syncfs is not None
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self._syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}", self._root_text)
        finally:
            os.close(fd)

    def _path(self, key: str) -> Path:
        # Keys come from validated UIDs and hashes; this is a second line of defence, not the
        # first. Lexical (normpath), not `resolve()`: resolving lstat()s every component of the
        # path on each put and get (~10 syscalls an object), and the only way out of the root it
        # would also catch is a symlink planted inside the data folder, which needs write access
        # to the data itself.
        path = os.path.normpath(os.path.join(self._root_text, key))
        if not path.startswith(self._root_prefix):
            raise ValueError("object key escapes the store root")
        return Path(path)

    @staticmethod
    def _make_dirs(directory: Path, gained: dict[Path, None] | None = None) -> None:
        """mkdir -p, then fsync each directory that gained an entry: a file's fsync makes its
        bytes durable, not the names that lead to it (a new instance gets new directories).
        With `gained`, those directories are added to it instead, for the caller to fsync."""
        if directory.is_dir():
            return
        missing: list[Path] = []
        walk = directory
        while not walk.exists():
            missing.append(walk)
            walk = walk.parent
        directory.mkdir(parents=True, exist_ok=True)
        for parent in dict.fromkeys(m.parent for m in reversed(missing)):
            if gained is None:
                _fsync_dir(parent)
            else:
                gained[parent] = None

    def put(self, key: str, data: BinaryIO, *, size: int | None = None) -> ObjectInfo:
        path = self._path(key)
        self._make_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # the rename itself
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return ObjectInfo(key=key, size=path.stat().st_size)

    def put_file(self, key: str, path: str, *, move: bool = False) -> ObjectInfo:
        if move:
            target = self._path(key)
            self._make_dirs(target.parent)
            try:
                # Durable before visible, as with put(): fsync the bytes, then rename into place.
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # A hard link, not a rename: the caller (pynetdicom, the STOW reader) still
                # removes its own file afterwards, and no byte is copied.
                tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
                os.link(path, tmp)
                os.replace(tmp, target)
                _fsync_dir(target.parent)
                return ObjectInfo(key=key, size=target.stat().st_size)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise  # else another filesystem or no hard links there: fall back to a copy
        with open(path, "rb") as f:
            return self.put(key, f)

    def put_files(self, items: Sequence[tuple[str, str]], *, move: bool = False) -> list[ObjectInfo]:
        """`put_file` for a group of (key, path), with the same guarantees for each object
        (its bytes durable before its name is visible, the names durable before this returns)
        but each fsync done once per group and side by side: the files' bytes together, then
        every directory that gained an entry (a series directory gaining four instances is
        synced once, not four times). Ingest stores C-STORE groups and STOW-RS batches with it."""
        if not move:
            return [self.put_file(key, path) for key, path in items]
        targets = [(key, self._path(key), path) for key, path in items]
        if self._syncfs is not None:
            self._sync_filesystem()  # every object's bytes, before any of their names appears
        else:
            _sync_all(_fsync_file, [path for _key, _target, path in targets])
        gained: dict[Path, None] = {}
        infos = self._link_all(targets, gained)
        if self._syncfs is not None:
            # The names. A source on another filesystem was not covered by the first syncfs: it
            # cannot be hard-linked either, so `put_file` copied it (its own fsyncs); a target
            # directory on another filesystem (a mount inside the folder) is fsynced on its own.
            self._sync_filesystem()
            gained = {d: None for d in gained if os.stat(d).st_dev != self._dev}
        _sync_all(_fsync_dir, gained)
        return infos

    def _link_all(self, targets: list[tuple[str, Path, str]], gained: dict[Path, None]) -> list[ObjectInfo]:
        """Each (key, target, source) hard-linked into place (a durable copy where links are not
        possible); the directories that gained an entry are added to `gained`, for the caller's
        sync of the names."""
        infos: list[ObjectInfo] = []
        for key, target, path in targets:
            self._make_dirs(target.parent, gained)
            tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
            try:
                os.link(path, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                infos.append(self.put_file(key, path))  # no hard links there: a durable copy
                continue
            os.replace(tmp, target)
            gained[target.parent] = None
            infos.append(ObjectInfo(key=key, size=target.stat().st_size))
        return infos

    def get(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        return self._iter(f, start, end, chunk_size)

    @staticmethod
    def _iter(f: BinaryIO, start: int, end: int | None, chunk_size: int) -> Iterator[bytes]:
        with f:
            f.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                n = chunk_size if remaining is None else min(chunk_size, remaining)
                chunk = f.read(n)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def open_local(self, key: str) -> str | None:
        path = self._path(key)
        return str(path) if path.exists() else None

    def head(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        return ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterable[ObjectInfo]:
        # Walk only below the prefix's folder: `studies/` must not walk the conflicts and the rest.
        start = self._path(prefix.rpartition("/")[0]) if "/" in prefix else self.root
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        continue  # removed since the directory was read
                    yield ObjectInfo(key=key, size=st.st_size, modified=st.st_mtime)

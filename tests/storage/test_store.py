"""The object store contract, on the local folder and on S3 (moto's server over HTTP)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from broker.db import _MIGRATIONS, make_engine, migrate
from broker.errors import InvalidUID
from broker.index.keys import conflict_key, instance_key
from broker.settings import Settings
from storage import LocalStore, ObjectNotFound, ObjectStore, StoreUnavailable, open_store
from storage.s3 import S3Store

MiB = 1024 * 1024
SHA = "5" * 64  # the store does not check content addresses; ingest does
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.1.1", "1.2.826.0.1.3680043.2.1.1.7"


def _deep_key(study: str, series: str, sop: str) -> str:
    """A key as deep as those earlier releases stored (and the store still serves)."""
    return f"studies/{study}/series/{series}/instances/{sop}/{SHA}.dcm"


class PatternReader:
    """A non-seekable stream of `size` deterministic bytes, as a network body would be.

    Hashes what it hands out, so a test can compare without holding the object, and can be
    told to fail after `fail_after` bytes, as a dropped client connection would.
    """

    def __init__(self, size: int, *, seed: int = 1, fail_after: int | None = None) -> None:
        self.remaining = size
        self.sent = 0
        self.fail_after = fail_after
        self.sha = hashlib.sha256()
        self._block = random.Random(seed).randbytes(MiB + 17)  # odd length: parts are not all alike
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise ConnectionResetError("client went away")
        n = self.remaining if n is None or n < 0 else min(n, self.remaining)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self._block) - self._pos)
            out += self._block[self._pos : self._pos + take]
            self._pos = (self._pos + take) % len(self._block)
        self.remaining -= n
        self.sent += n
        self.sha.update(out)
        return bytes(out)

    def seekable(self) -> bool:
        return False


@pytest.fixture(params=["local", "s3", "s3-prefix"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    moto_url: str = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    prefix = "site-a/objects" if request.param == "s3-prefix" else ""
    return S3Store(bucket=bucket, prefix=prefix, endpoint_url=moto_url, create_bucket=True)


def _read(store: ObjectStore, key: str, **kwargs: Any) -> bytes:
    return b"".join(store.get(key, **kwargs))


def test_both_backends_satisfy_the_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_big_object_streams_in_and_out(store: ObjectStore) -> None:
    # Above the multipart threshold, from a stream that cannot seek: S3 gets several parts.
    size = 17 * MiB + 123
    src = PatternReader(size)
    info = store.put(_deep_key(STUDY, SERIES, SOP), src)  # type: ignore[arg-type]
    assert info.size == size
    assert store.head(info.key).size == size

    out = hashlib.sha256()
    chunks = 0
    for chunk in store.get(info.key, chunk_size=MiB):
        assert 0 < len(chunk) <= MiB  # streamed in bounded pieces, never the whole object
        out.update(chunk)
        chunks += 1
    assert chunks >= 17
    assert out.hexdigest() == src.sha.hexdigest()


def test_put_from_a_seekable_stream_starts_where_the_stream_is(store: ObjectStore) -> None:
    buf = io.BytesIO(b"HEADER" + b"payload")
    buf.seek(6)
    info = store.put("a/b.bin", buf)
    assert info.size == 7
    assert _read(store, "a/b.bin") == b"payload"


def test_put_file_and_overwrite(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "in.dcm"
    src.write_bytes(b"x" * 1000)
    assert store.put_file("k/one.dcm", str(src)).size == 1000
    assert store.put("k/one.dcm", io.BytesIO(b"second")).size == 6
    assert _read(store, "k/one.dcm") == b"second"


DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable enough


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 10),  # the start
        (len(DATA) - 10, None),  # the tail, open-ended
        (1000, 5000),  # the middle
        (len(DATA) - 5, len(DATA) + 100),  # end beyond the object: cut at its end
        (len(DATA), None),  # start at the end: nothing
        (len(DATA) + 10, len(DATA) + 20),  # entirely beyond: nothing
        (7, 7),  # empty range
        (0, None),  # the whole object
    ],
)
def test_ranged_get(store: ObjectStore, start: int, end: int | None) -> None:
    store.put("r/obj", io.BytesIO(DATA))
    assert _read(store, "r/obj", start=start, end=end, chunk_size=999) == DATA[start:end]


def test_missing_keys_raise_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.head("no/such")
    # Raised at the call, before a caller starts a response, not on first iteration.
    with pytest.raises(ObjectNotFound):
        store.get("no/such")
    with pytest.raises(ObjectNotFound):
        store.get("no/such", start=0, end=0)
    store.delete("no/such")  # deleting what is not there is not an error


def test_delete_removes_the_object(store: ObjectStore) -> None:
    store.put("d/x", io.BytesIO(b"1"))
    store.put("d/y", io.BytesIO(b"2"))
    store.delete("d/x")
    with pytest.raises(ObjectNotFound):
        store.head("d/x")
    with pytest.raises(ObjectNotFound):
        store.get("d/x")
    assert [i.key for i in store.list("d/")] == ["d/y"]


def test_head_and_list_say_when_an_object_was_written(store: ObjectStore) -> None:
    """The reaper removes only objects older than a grace period: it needs their age."""
    before = time.time()
    store.put("w/x", io.BytesIO(b"1"))
    after = time.time()
    (listed,) = store.list("w/")
    for info in (store.head("w/x"), listed):
        assert info.modified is not None
        assert before - 2 <= info.modified <= after + 2  # S3 keeps whole seconds


def test_list_by_prefix(store: ObjectStore) -> None:
    keys = {
        _deep_key("1.2.3", "1.2.3.4", "1.2.3.4.5"): b"a",
        _deep_key("1.2.3", "1.2.3.4", "1.2.3.4.6"): b"bb",
        _deep_key("1.2.30", "1.2.30.1", "1.2.30.1.1"): b"ccc",
        instance_key("e" * 64): b"eeeee",
        conflict_key("1.2.3.4.5", "0" * 64): b"dddd",
    }
    for key, body in keys.items():
        store.put(key, io.BytesIO(body))
    listed = {i.key: i.size for i in store.list("studies/1.2.3/")}
    assert listed == {k: len(v) for k, v in keys.items() if k.startswith("studies/1.2.3/")}
    assert {i.key: i.size for i in store.list()} == {k: len(v) for k, v in keys.items()}
    assert list(store.list("studies/9.9/")) == []
    assert [i.key for i in store.list("dcm/")] == [f"dcm/ee/{'e' * 64}.dcm"]


def test_failed_put_leaves_no_partial_object(store: ObjectStore) -> None:
    key = _deep_key(STUDY, SERIES, SOP)
    store.put(key, io.BytesIO(b"the acknowledged copy"))
    # Fails after 20 MiB: past S3's first parts, mid-file for the local store.
    with pytest.raises(ConnectionResetError):
        store.put(key, PatternReader(40 * MiB, fail_after=20 * MiB))  # type: ignore[arg-type]
    assert _read(store, key) == b"the acknowledged copy"
    assert [i.key for i in store.list()] == [key]

    other = _deep_key(STUDY, SERIES, SOP + ".1")
    with pytest.raises(ConnectionResetError):
        store.put(other, PatternReader(40 * MiB, fail_after=20 * MiB))  # type: ignore[arg-type]
    with pytest.raises(ObjectNotFound):
        store.head(other)
    if isinstance(store, LocalStore):
        assert not list(store.root.rglob(".tmp-*"))  # no temp file left behind either
    if isinstance(store, S3Store):  # the aborted multipart upload does not linger (and bill)
        assert "Uploads" not in store._client.list_multipart_uploads(Bucket=store.bucket)


def test_open_local_only_on_the_local_store(store: ObjectStore) -> None:
    store.put("o/x", io.BytesIO(b"bytes"))
    path = store.open_local("o/x")
    if isinstance(store, LocalStore):
        assert path is not None and Path(path).read_bytes() == b"bytes"
        assert store.open_local("o/missing") is None
    else:
        assert path is None


def test_store_url_reopens_the_same_objects(store: ObjectStore) -> None:
    store.put("u/x", io.BytesIO(b"same"))
    again = open_store(store.url)
    assert type(again) is type(store)
    assert _read(again, "u/x") == b"same"


def test_path_like_keys_never_reach_the_backend(store: ObjectStore) -> None:
    for bad in ("../escape", "/abs", "a/../../b"):
        with pytest.raises(ValueError):
            store.put(bad, io.BytesIO(b"x"))


def test_s3_prefixes_keep_tenants_apart(moto_server: str, s3_bucket: str) -> None:
    a = S3Store(bucket=s3_bucket, prefix="a", endpoint_url=moto_server, create_bucket=True)
    ab = S3Store(bucket=s3_bucket, prefix="ab", endpoint_url=moto_server)
    a.put("k", io.BytesIO(b"1"))
    ab.put("k", io.BytesIO(b"22"))
    assert [(i.key, i.size) for i in a.list()] == [("k", 1)]
    assert [(i.key, i.size) for i in ab.list()] == [("k", 2)]


def test_s3_list_follows_continuation_pages(moto_server: str, s3_bucket: str) -> None:
    store = S3Store(bucket=s3_bucket, prefix="pfx", endpoint_url=moto_server, create_bucket=True)
    store.list_page_size = 2  # as S3 does at 1000 keys, without putting 1001 objects
    for i in range(7):
        store.put(f"p/{i}", io.BytesIO(b"x" * i))
    store.put("q/0", io.BytesIO(b""))
    assert [(i.key, i.size) for i in store.list("p/")] == [(f"p/{i}", i) for i in range(7)]


def test_s3_store_is_shared_by_threads(moto_server: str, s3_bucket: str) -> None:
    store = S3Store(bucket=s3_bucket, endpoint_url=moto_server, create_bucket=True)
    barrier = threading.Barrier(8)

    def work(i: int) -> bytes:
        barrier.wait()
        body = f"object {i}".encode() * 1000
        store.put(f"t/{i}", io.BytesIO(body))
        return _read(store, f"t/{i}", start=7, end=5000)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [(f"object {i}".encode() * 1000)[7:5000] for i in range(8)]


def test_s3_unreachable_endpoint_is_unavailable(unused_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # signing needs some credentials first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store(bucket="b", endpoint_url=f"http://127.0.0.1:{unused_port}")
    with pytest.raises(StoreUnavailable):
        store.head("k")


@pytest.fixture
def unused_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]  # bound but not listening: connections are refused


# -- keys ---------------------------------------------------------------------------------


def test_instance_key_layout() -> None:
    # Content-addressed and short (it is in every index row); two folder levels at most.
    assert instance_key(SHA) == f"dcm/55/{SHA}.dcm"
    assert len(instance_key(SHA)) == 75
    for bad_hash in ("A" * 64, "a" * 63, "../" + "a" * 61, "", "a" * 63 + "/"):
        with pytest.raises(ValueError):
            instance_key(bad_hash)


def test_conflict_key_rejects_bad_input() -> None:
    assert conflict_key("1.2.3", "a" * 64) == f"conflicts/1.2.3/{'a' * 64}.dcm"
    with pytest.raises(InvalidUID):
        conflict_key("../etc", "a" * 64)
    for bad_hash in ("A" * 64, "a" * 63, "../" + "a" * 61):
        with pytest.raises(ValueError):
            conflict_key("1.2.3", bad_hash)


# -- migrations -------------------------------------------------------------------------


def _heads() -> set[str]:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return set(ScriptDirectory.from_config(cfg).get_heads())


def _migrate_twice(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            tables_after_first = set(sa.inspect(conn).get_table_names())
        migrate(engine)  # a restarted node migrates again: must be a no-op, not an error
        with engine.connect() as conn:
            assert set(sa.inspect(conn).get_table_names()) == tables_after_first
            versions = {row[0] for row in conn.execute(sa.text("SELECT version_num FROM alembic_version"))}
    finally:
        engine.dispose()
    assert versions == _heads()
    assert {"facility", "study", "series", "alembic_version"} <= tables_after_first


def test_migrate_twice_on_sqlite(tmp_path: Path) -> None:
    _migrate_twice(f"sqlite:///{tmp_path / 'index.sqlite3'}")


@pytest.mark.postgres
def test_migrate_twice_on_postgres(pg_admin: Any) -> None:  # tests/conftest.py PgAdmin
    # Its own empty database: the session's pg_url stays as other tests expect it.
    name = pg_admin.new_name("m")
    try:
        _migrate_twice(pg_admin.create(name))
    finally:
        pg_admin.drop(name)


# -- the shared backend fixture ----------------------------------------------------------


@pytest.mark.parametrize("run", ["first", "second"])
def test_backend_is_fresh_for_every_test(settings: Settings, run: str) -> None:
    # Runs twice per backend: the second run fails if the first one's table or object leaked.
    store = open_store(settings.resolved_storage_url())
    assert list(store.list()) == []
    engine = make_engine(settings.resolved_database_url())
    try:
        migrate(engine)
        with engine.begin() as conn:
            assert "leak_check" not in sa.inspect(conn).get_table_names()
            conn.execute(sa.text("CREATE TABLE leak_check (x integer)"))
    finally:
        engine.dispose()
    store.put("leak/check", io.BytesIO(run.encode()))
    assert [i.key for i in open_store(settings.resolved_storage_url()).list()] == ["leak/check"]


_PUT_IN_CHILD = """
import os, resource, sys
from storage.s3 import S3Store

class Endless:  # a non-seekable body of the given size, as from a socket
    def __init__(self, size): self.left = size; self.block = os.urandom(1 << 20)
    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left); self.left -= n
        return (self.block * (n // len(self.block) + 1))[:n]
    def seekable(self): return False

store = S3Store(bucket=sys.argv[2], endpoint_url=sys.argv[1], create_bucket=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = store.put("big", Endless(int(sys.argv[3])))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(info.size, (after - before) // 1024)
"""


def test_s3_put_memory_does_not_grow_with_the_object(moto_server: str, s3_bucket: str) -> None:
    # In a child process so that moto's own copy of the object is not counted.
    size = 160 * MiB
    out = subprocess.run(
        [sys.executable, "-c", _PUT_IN_CHILD, moto_server, s3_bucket, str(size)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    ).stdout.split()
    stored, grew_mib = int(out[0]), int(out[1])
    assert stored == size
    # Read-ahead and parts in flight are bounded (~16 MiB threshold + 4 x 8 MiB parts).
    assert grew_mib < 100, f"a {size // MiB} MiB put grew the process by {grew_mib} MiB"


@pytest.mark.parametrize("how", ["put", "put_file", "put_file_move"])
def test_local_store_syncs_the_names_too(how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a power loss an acknowledged object must still be found under its key: besides its
    bytes, the new directories and the rename into place are synced (every fsync still runs)."""
    store = LocalStore(tmp_path / "objects")
    source = tmp_path / "in.dcm"
    source.write_bytes(b"object")
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    key = _deep_key("1.2.3", "1.2.3.4", "1.2.3.4.5")
    if how == "put":
        store.put(key, io.BytesIO(b"object"))
    else:
        store.put_file(key, str(source), move=how == "put_file_move")
    path = store.root / key

    def ident(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_dev, st.st_ino

    assert ident(path) in synced
    # Every directory from the store's root down to the object's own gained an entry.
    below_root = path.parent.relative_to(store.root).parents[:-1]
    for directory in [store.root, *(store.root / d for d in below_root), path.parent]:
        assert ident(directory) in synced, directory


def _group_of_four(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Four received files ("object 0" ... "object 3") and their keys, all in one series."""
    keys, sources = [], []
    for n in range(4):
        src = tmp_path / f"in{n}.dcm"
        src.write_bytes(f"object {n}".encode())
        sources.append(str(src))
        keys.append(_deep_key("1.2.3", "1.2.3.4", f"1.2.3.4.{n}"))
    return keys, sources


def test_local_store_group_put_syncs_every_object_and_name_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`put_files` (a group of C-STOREs): each object's bytes are synced before its name appears,
    and every directory that gained an entry is synced before the call returns; a directory
    shared by the group is synced once, not once per object."""
    store = LocalStore(tmp_path / "objects")
    keys, sources = _group_of_four(tmp_path)
    targets = {os.stat(src).st_ino: store.root / key for src, key in zip(sources, keys, strict=True)}
    synced: list[tuple[int, int]] = []
    visible_before_sync: list[Path] = []
    real_fsync = os.fsync
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        target = targets.get(st.st_ino)
        if target is not None and target.exists():
            visible_before_sync.append(target)
        real_fsync(fd)
        with lock:
            synced.append((st.st_dev, st.st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    infos = store.put_files(list(zip(keys, sources, strict=True)), move=True)

    assert [i.key for i in infos] == keys
    assert [_read(store, k) for k in keys] == [f"object {n}".encode() for n in range(4)]
    assert not visible_before_sync

    def ident(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_dev, st.st_ino

    paths = [store.root / k for k in keys]
    assert all(ident(p) in synced for p in paths)
    series_instances = paths[0].parent.parent  # .../series/<uid>/instances, shared by all four
    for directory in [store.root, series_instances, *(p.parent for p in paths)]:
        assert ident(directory) in synced, directory
    assert synced.count(ident(series_instances)) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs(2) is Linux's")
def test_local_store_syncfs_group_put_syncs_bytes_before_names_and_names_before_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `storage_sync = syncfs` a group is made durable by syncing the folder's filesystem:
    once before any object's name appears (their bytes) and once after all have (the names),
    before `put_files` returns; nothing is fsynced object by object."""
    store = open_store(f"{(tmp_path / 'objects').as_uri()}?sync=syncfs")
    assert isinstance(store, LocalStore) and store.sync == "syncfs"
    keys, sources = _group_of_four(tmp_path)
    visible_at_each_sync: list[int] = []
    real_syncfs = store._syncfs
    assert real_syncfs is not None

    def syncfs(fd: int) -> int:
        visible_at_each_sync.append(sum((store.root / k).exists() for k in keys))
        return real_syncfs(fd)

    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(store, "_syncfs", syncfs)

    def fsync(fd: int) -> None:
        fsynced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    infos = store.put_files(list(zip(keys, sources, strict=True)), move=True)

    assert [i.key for i in infos] == keys
    assert [_read(store, k) for k in keys] == [f"object {n}".encode() for n in range(4)]
    assert visible_at_each_sync == [0, 4]
    assert not fsynced


def test_local_store_without_syncfs_falls_back_to_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the C library has no syncfs (not Linux, an old libc) the setting falls back to the
    per-object fsyncs rather than failing the server's start or the group's put."""
    import storage.local

    monkeypatch.setattr(storage.local, "_load_syncfs", lambda: None)
    store = LocalStore(tmp_path / "objects", sync="syncfs")
    assert store.sync == "fsync"
    src = tmp_path / "in.dcm"
    src.write_bytes(b"object")
    src2 = tmp_path / "in2.dcm"
    src2.write_bytes(b"object 2")
    keys = [_deep_key("1.2.3", "1.2.3.4", "1.2.3.4.1"), _deep_key("1.2.3", "1.2.3.4", "1.2.3.4.2")]
    store.put_files([(keys[0], str(src)), (keys[1], str(src2))], move=True)
    assert [_read(store, k) for k in keys] == [b"object", b"object 2"]
    with pytest.raises(ValueError, match="sync must be one of"):
        LocalStore(tmp_path / "objects", sync="nosync")


@pytest.fixture
def failing_s3() -> Iterator[tuple[str, list[str]]]:
    """An S3 endpoint that answers every request with a server error, as a store under strain
    does (InternalError 500, SlowDown 503); yields its URL and the methods it was sent."""
    import http.server

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            seen.append(self.command)
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            code, status = ("SlowDown", 503) if self.command == "GET" else ("InternalError", 500)
            body = f"<Error><Code>{code}</Code><Message>strained</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _fail

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_s3_server_errors_are_unavailable_not_a_crash(failing_s3: tuple[str, list[str]]) -> None:
    """A store answering 5xx (after botocore's retries) is StoreUnavailable, which every
    interface answers as 503 / 0xA700 "try again", never as a 500: an upload s3transfer gave up
    on included (it wraps the cause in its own S3UploadFailedError)."""
    url, seen = failing_s3
    store = S3Store(bucket="b", endpoint_url=url, retries=0, connect_timeout=1, read_timeout=2)
    with pytest.raises(StoreUnavailable):
        store.put("s/x", io.BytesIO(b"x" * 1000))
    with pytest.raises(StoreUnavailable):
        store.put("s/y", io.BytesIO(b"y" * 1000), size=1000)
    with pytest.raises(StoreUnavailable):
        store.head("s/x")
    with pytest.raises(StoreUnavailable):
        b"".join(store.get("s/x"))
    with pytest.raises(StoreUnavailable):
        store.delete("s/x")
    assert {"PUT", "HEAD", "GET", "DELETE"} <= set(seen)  # each call reached the store


def test_a_bucket_that_does_not_exist_is_unavailable_not_a_crash(moto_server: str, s3_bucket: str) -> None:
    """A typo in the bucket name (or another account's bucket): put, get and list raise
    StoreUnavailable (HTTP 503, DIMSE out of resources, one line from `scanonce verify`), as for an
    unreachable endpoint, naming the S3 error code."""
    store = S3Store(bucket=f"{s3_bucket}-missing", endpoint_url=moto_server, retries=0)
    key = instance_key("ab" * 32)
    for attempt in (
        lambda: store.put(key, io.BytesIO(b"x")),
        lambda: store.get(key),
        lambda: list(store.list("dcm/")),
        lambda: store.head(key),
    ):
        with pytest.raises(StoreUnavailable) as refused:
            attempt()
        assert "NoSuchBucket" in refused.value.message or "refused the upload" in refused.value.message


def test_a_deleted_bucket_is_unavailable_not_missing_objects(
    moto_server: str, s3_bucket: str, s3_client: Any
) -> None:
    """S3 answers a HEAD of an object in a bucket that is gone with a bare 404, as for a missing
    object. An operator whose bucket was deleted (or whose URL names the wrong one) must hear that
    the store is unavailable, naming the bucket, not see every study "missing"."""
    store = S3Store(bucket=s3_bucket, endpoint_url=moto_server, create_bucket=True, retries=0)
    key = instance_key("cd" * 32)
    store.put(key, io.BytesIO(b"stored"))
    with pytest.raises(ObjectNotFound):  # the bucket is there: a missing key is just that
        store.head(instance_key("ef" * 32))
    s3_client.delete_object(Bucket=s3_bucket, Key=key)
    s3_client.delete_bucket(Bucket=s3_bucket)

    store = S3Store(bucket=s3_bucket, endpoint_url=moto_server, retries=0)  # a node started afterwards
    for attempt in (
        lambda: store.head(key),
        lambda: store.get(key),
        lambda: store.get(key, start=5, end=5),  # an empty range is answered by a HEAD
    ):
        with pytest.raises(StoreUnavailable) as refused:
            attempt()
        assert s3_bucket in refused.value.message and "does not exist" in refused.value.message


def test_the_bucket_is_asked_once_for_a_burst_of_missing_objects(moto_server: str, s3_bucket: str) -> None:
    """A verify (or a viewer) meeting many missing objects does not double its requests: the
    bucket's HEAD that tells a missing object from a missing bucket is asked once in a while."""
    store = S3Store(bucket=s3_bucket, endpoint_url=moto_server, create_bucket=True, retries=0)
    asked: list[str] = []
    # botocore's own event, seen as the request goes out over HTTP (nothing is patched).
    store._client.meta.events.register("before-call.s3.HeadBucket", lambda **_kw: asked.append("bucket"))
    for n in range(20):
        with pytest.raises(ObjectNotFound):
            store.head(f"missing/{n}")
    assert asked == ["bucket"]

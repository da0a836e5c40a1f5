"""A broker cluster on this machine, from real parts: a fresh PostgreSQL database, a moto S3
server behind a TCP fault relay, N `scanonce serve` nodes (and `scanonce worker` processes where
the CLI has them) as subprocesses on free loopback ports, and HAProxy in front of the nodes with
health checks on /readyz (HTTP, and TCP mode for DIMSE).

Used by tests/cluster (the fault matrix) and bench/cluster.py (the 1 -> 3 node curve): plain
classes, no pytest, so that both can drive the same cluster.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import URL

PG_DSN = os.environ.get("SCANONCE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
SCANONCE = str(Path(sys.executable).with_name("scanonce"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until predicate() is true; the seconds it took. Raises TimeoutError naming `what`."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        time.sleep(interval)


# ---------------------------------------------------------------------------- the fault relay


class Relay:
    """A TCP relay in front of a server, with three modes:

    - "pass": bytes flow both ways;
    - "refuse": every connection, new or open, is reset (the server is down);
    - "stall": connections are accepted, and open ones kept, but no byte moves either way (a
      server that hangs: clients see only their own timeouts).
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode = "pass"
        self._cond = threading.Condition()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "stall")
        with self._cond:
            self.mode = mode
            if mode == "refuse":
                for conn in list(self._conns):
                    _reset(conn)
                self._conns.clear()
            self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        self.set_mode("refuse")
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.mode == "refuse":
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        with self._cond:
            self._conns.update((client, upstream))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                with self._cond:
                    while self.mode == "stall":
                        self._cond.wait()
                    if self.mode == "refuse":
                        break
                data = src.recv(65536)
                if not data:
                    break
                with self._cond:  # a stall that began while we read holds this chunk back too
                    while self.mode == "stall":
                        self._cond.wait()
                    if self.mode == "refuse":
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._cond:
                self._conns.discard(src)
                self._conns.discard(dst)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        # linger 0: close sends RST, as a server that is gone would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


# ---------------------------------------------------------------------------- PostgreSQL


class Database:
    """A fresh database on the local server, dropped by close()."""

    def __init__(self, tag: str = "cluster") -> None:
        self.params = {k: str(v) for k, v in conninfo_to_dict(PG_DSN).items() if v not in (None, "")}
        # tests/conftest.py's naming: a run killed before its teardown has its database dropped by
        # the next test session (its admin connection, named after the run, is gone by then).
        run = f"scanonce_test_{os.getpid()}_{secrets.token_hex(3)}"
        self.name = f"{run}_{tag}"
        self.admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5, application_name=run)
        self.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        self.url = URL.create(
            "postgresql+psycopg",
            username=self.params.get("user"),
            password=self.params.get("password"),
            host=self.params.get("host"),
            port=int(self.params["port"]) if "port" in self.params else None,
            database=self.name,
        ).render_as_string(hide_password=False)

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            conninfo=make_conninfo(**{**self.params, "dbname": self.name}), autocommit=True, connect_timeout=5
        )

    def break_connections(self) -> int:
        """Terminate every session on this database (the nodes' and workers' pools): what a
        PostgreSQL restart or failover does to them. The number terminated."""
        rows = self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.name,),
        ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )
        self.admin.close()


# ---------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        # A process group of its own: it (and any child it forks) is killed by its own id only.
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            self.kill(signal.SIGTERM)
        self.kill(signal.SIGKILL)

    def tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


@dataclass
class Node:
    proc: Proc
    http_port: int
    dimse_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@functools.cache
def cli_has(command: str) -> bool:
    """Whether this checkout's `scanonce` has a sub-command (worker, verify, db ...)."""
    out = subprocess.run([SCANONCE, "--help"], capture_output=True, text=True, timeout=60).stdout
    return any(
        line.strip().startswith(("│ " + command + " ", command + " ")) for line in out.splitlines()
    ) or (f" {command} " in out)


@dataclass
class Cluster:
    """Everything above; `start()` brings it up, `close()` takes all of it down."""

    nodes_wanted: int = 3
    workers_wanted: int = 2
    signing_key_file: Path | None = None
    storage_timeouts: dict[str, str] = field(
        default_factory=lambda: {"connect_timeout": "1", "read_timeout": "1.5", "retries": "1"}
    )
    extra_env: dict[str, str] = field(default_factory=dict)
    # The workers' command line (a test may run `scanonce` with an extra job kind of its own).
    worker_argv: list[str] = field(default_factory=lambda: [SCANONCE, "worker"])
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="scanonce-cluster-")))
    nodes: list[Node] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)
    db: Database | None = None
    relay: Relay | None = None
    moto: Proc | None = None
    haproxy: Proc | None = None
    bucket: str = field(default_factory=lambda: f"cluster-{secrets.token_hex(6)}")
    http_port: int = 0
    dimse_port: int = 0
    moto_port: int = 0
    first_start_seconds: list[float] = field(default_factory=list)

    # -- bring-up -----------------------------------------------------------------------

    def start(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.db = Database()
        self._start_moto()
        self.relay = Relay(self.moto_port)
        self.migrate()
        # The caller's key (tests/conftest.py sets one for every broker the tests start), so that
        # tests.support.auth_headers mints tokens the nodes accept.
        env_key = os.environ.get("SCANONCE_AUTH_SIGNING_KEY_FILE")
        key = self.signing_key_file or (Path(env_key) if env_key else self.root / "signing-key.json")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SCANONCE_")},
            **AWS_ENV,
            "SCANONCE_DATABASE_URL": self.db.url,
            "SCANONCE_STORAGE_URL": self.storage_url(),
            "SCANONCE_AUTH_SIGNING_KEY_FILE": str(key),
            # 2 cores for 3 nodes: parse in-process (no pool per node), no index sync schedule.
            "SCANONCE_INGEST_PROCESSES": "0",
            "SCANONCE_SYNC_INTERVAL_SECONDS": "0",
            "SCANONCE_MLLP_PORT": "0",
            # As infra/ deploys a fleet: a bucket fault leaves the nodes in, degraded.
            "SCANONCE_READYZ_REQUIRES_STORE": "false",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        for i in range(self.nodes_wanted):
            self.nodes.append(self._node(i))
        # All at once, as a fleet starts: the first-start default rows race here.
        for node in self.nodes:
            node.proc.start()
        for node in self.nodes:
            self.first_start_seconds.append(self.wait_ready(node, timeout=90))
        if self.workers_wanted and cli_has("worker"):
            for i in range(self.workers_wanted):
                data = self.root / f"worker{i}"
                data.mkdir(exist_ok=True)
                env = {**self.env, "SCANONCE_DATA_DIR": str(data)}
                proc = Proc(f"worker{i}", self.worker_argv, env, self.root / f"worker{i}.log")
                proc.start()
                self.workers.append(proc)
        self._start_haproxy()

    def _start_moto(self) -> None:
        self.moto_port = free_port()
        self.moto = Proc(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
            {**os.environ, **AWS_ENV},
            self.root / "moto.log",
        )
        self.moto.start()
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{self.moto_port}/", timeout=1), timeout=30, what="moto"
        )
        self.s3().create_bucket(Bucket=self.bucket)

    def s3(self) -> Any:
        """A boto3 client on moto itself (not through the relay): the harness's view of the bucket."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}")

    def storage_url(self) -> str:
        assert self.relay is not None
        query = {"endpoint_url": f"http://127.0.0.1:{self.relay.port}", **self.storage_timeouts}
        return f"s3://{self.bucket}?" + urlencode(query)

    def migrate(self) -> None:
        """Once, before any node starts (`scanonce db upgrade` where the CLI has it)."""
        assert self.db is not None
        env = {
            **os.environ,
            "SCANONCE_DATABASE_URL": self.db.url,
            "SCANONCE_DATA_DIR": str(self.root / "migrate"),
        }
        if cli_has("db"):
            subprocess.run([SCANONCE, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
        else:
            from broker.db import make_engine, migrate

            engine = make_engine(self.db.url)
            try:
                migrate(engine)
            finally:
                engine.dispose()

    def _node(self, i: int) -> Node:
        http, dimse = free_port(), free_port()
        data = self.root / f"node{i}"
        data.mkdir(exist_ok=True)
        argv = [
            SCANONCE, "serve", "--data-dir", str(data), "--host", "127.0.0.1",
            "--port", str(http), "--dimse-port", str(dimse), "--mllp-port", "0", "--log-level", "warning",
        ]  # fmt: skip
        return Node(Proc(f"node{i}", argv, self.env, self.root / f"node{i}.log"), http, dimse)

    def wait_ready(self, node: Node, *, timeout: float = 60) -> float:
        def up() -> bool:
            if not node.proc.alive:
                raise RuntimeError(f"{node.proc.name} exited:\n{node.proc.tail()}")
            return node.ready()

        start = time.monotonic()
        while True:
            try:
                if up():
                    return time.monotonic() - start
            except RuntimeError:
                raise
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{node.proc.name} not ready within {timeout:.0f} s:\n{node.proc.tail()}")
            time.sleep(0.05)

    def _start_haproxy(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.http_port, self.dimse_port = free_port(), free_port()
        servers_http = "\n".join(
            f"    server n{i} 127.0.0.1:{n.http_port} check" for i, n in enumerate(self.nodes)
        )
        servers_dimse = "\n".join(
            f"    server n{i} 127.0.0.1:{n.dimse_port} check port {n.http_port}"
            for i, n in enumerate(self.nodes)
        )
        config = f"""
global
    maxconn 4096
    tune.bufsize 65536

defaults
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1
    default-server inter 300ms fastinter 200ms downinter 300ms fall 2 rise 1

frontend http_in
    mode http
    bind 127.0.0.1:{self.http_port}
    default_backend nodes_http

backend nodes_http
    mode http
    balance roundrobin
    # A request the node never answered (it died before a byte) goes to another node: STOW-RS
    # is idempotent (same SOP Instance UID, same bytes: one instance), so resending it is safe.
    option http-buffer-request
    retry-on conn-failure empty-response
    option httpchk GET /readyz
    http-check expect status 200
{servers_http}

frontend dimse_in
    mode tcp
    bind 127.0.0.1:{self.dimse_port}
    default_backend nodes_dimse

backend nodes_dimse
    mode tcp
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
{servers_dimse}
"""
        path = self.root / "haproxy.cfg"
        path.write_text(config)
        subprocess.run([haproxy, "-c", "-q", "-f", str(path)], check=True, timeout=30)
        self.haproxy = Proc(
            "haproxy", [haproxy, "-db", "-f", str(path)], dict(os.environ), self.root / "haproxy.log"
        )
        self.haproxy.start()
        wait_until(lambda: self.balancer_ready(), timeout=30, what="HAProxy")

    def balancer_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- faults ---------------------------------------------------------------------------

    def kill_node(self, i: int) -> None:
        self.nodes[i].proc.kill(signal.SIGKILL)

    def restart_node(self, i: int, *, timeout: float = 60) -> float:
        """Start a stopped node again on its ports; seconds from exec to ready."""
        node = self.nodes[i]
        node.proc.stop()
        node.proc.start()
        return self.wait_ready(node, timeout=timeout)

    # -- inspection ---------------------------------------------------------------------

    def verify(self) -> subprocess.CompletedProcess[str] | None:
        """`scanonce verify` over the whole index and bucket (None where the CLI has no verify):
        exit 0 when no object is missing or changed and no orphan older than its --min-age
        (60 s: younger ones may be an ingest under way) is left."""
        if not cli_has("verify"):
            return None
        env = {**self.env, "SCANONCE_DATA_DIR": str(self.root / "verify")}
        return subprocess.run(
            [SCANONCE, "verify"], env=env, capture_output=True, text=True, timeout=120, cwd=self.root
        )

    def index_rows(self) -> dict[str, tuple[str, str, int]]:
        """sop_uid -> (sha256, object_key, size) of every indexed instance (what queries see)."""
        assert self.db is not None
        with self.db.connect() as conn:
            rows = conn.execute("SELECT sop_uid, sha256, object_key, size FROM instance").fetchall()
        return {sop: (sha, key, int(size)) for sop, sha, key, size in rows}

    def bucket_keys(self) -> dict[str, int]:
        keys: dict[str, int] = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", ()):
                keys[obj["Key"]] = int(obj["Size"])
        return keys

    def object_sha(self, key: str) -> str:
        body = self.s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return hashlib.sha256(body).hexdigest()

    def logs(self) -> Iterator[tuple[str, str]]:
        for proc in [n.proc for n in self.nodes] + self.workers + [p for p in (self.haproxy, self.moto) if p]:
            yield proc.name, proc.tail()

    # -- take-down -----------------------------------------------------------------------

    def close(self) -> None:
        for proc in ([self.haproxy] if self.haproxy else []) + self.workers + [n.proc for n in self.nodes]:
            proc.stop()
        if self.relay is not None:
            self.relay.close()
        if self.moto is not None:
            self.moto.stop()
        if self.db is not None:
            self.db.close()
        if os.environ.get("SCANONCE_CLUSTER_KEEP"):  # the logs, for a failure to be read later
            print(f"cluster files kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

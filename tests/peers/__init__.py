"""Real DICOM peers for tests and benchmarks: Orthanc (Debian package) and dcmtk tools.

Every peer runs as a child process of the test, on free loopback ports, with its own
configuration and data folders under the caller's temporary directory; never as a system
service. Each is a context manager that stops its process (and only its process) on exit,
even when the test fails.

    with orthanc(tmp_path) as peer:
        httpx.get(f"{peer.url}/system")
        httpx.get(f"{peer.dicomweb_url}/studies")

    with storescp(tmp_path / "in", aet="SINK") as sink:
        dcmtk("storescu", "-aec", sink.aet, "127.0.0.1", str(sink.port), "file.dcm")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
# The Debian package installs the plugin under /usr/share/orthanc/plugins (a symlink to
# /usr/lib/orthanc/libOrthancDicomWeb.so.*). We load this one file rather than the whole
# folder so the other packaged plugins (worklists, serve-folders) stay out of the peer.
ORTHANC_PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
ORTHANC_DICOMWEB_PLUGIN = ORTHANC_PLUGIN_DIR / "libOrthancDicomWeb.so"

LOOPBACK = "127.0.0.1"


# -- ports ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, host: str = LOOPBACK, timeout: float = 20.0, proc: Any = None) -> None:
    """Block until something accepts TCP connections on (host, port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise PeerError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class PeerError(RuntimeError):
    """A peer could not be started or did not answer."""


def _stop(proc: subprocess.Popen[Any], *, grace: float = 10.0) -> None:
    """SIGTERM our own child, then SIGKILL if it lingers; never touches other processes."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- Orthanc --------------------------------------------------------------------------------


@dataclass
class OrthancPeer:
    """A running Orthanc. `url` has no trailing slash; `dicomweb_url` is url + '/dicom-web'."""

    url: str
    http_port: int
    dicom_port: int
    aet: str
    host: str
    config: dict[str, Any]
    config_path: Path
    storage_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """The end of Orthanc's log, for assertion messages."""
        return _tail(self.log_path)


def orthanc_config(
    tmp_dir: Path,
    *,
    dicomweb: bool = True,
    aet: str = "ORTHANC",
    modalities: Mapping[str, Sequence[Any]] | None = None,
    http_port: int,
    dicom_port: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON configuration `orthanc()` writes. `modalities` maps a symbolic name to
    [AET, host, port] (Orthanc's DicomModalities format); `extra` overrides any key."""
    cfg: dict[str, Any] = {
        "Name": f"scanonce-test-{aet}",
        "StorageDirectory": str(tmp_dir / "storage"),
        "IndexDirectory": str(tmp_dir / "index"),
        "StorageCompression": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": False,
        # Accept stores from any AE, as a test peer must (Orthanc's default for unknown AEs).
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {name: list(v) for name, v in (modalities or {}).items()},
        "KeepAlive": True,
        "TcpNoDelay": True,
        "HttpCompressionEnabled": False,
        # Nothing to persist between runs, and jobs must not outlive the peer.
        "SaveJobs": False,
        "MetricsEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)] if dicomweb else [],
    }
    if dicomweb:
        cfg["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Host": LOOPBACK,
            "Ssl": False,
        }
    if extra:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
    return cfg


@contextlib.contextmanager
def orthanc(
    tmp_dir: Path | str,
    *,
    dicomweb: bool = True,
    aet: str = "ORTHANC",
    modalities: Mapping[str, Sequence[Any]] | None = None,
    http_port: int | None = None,
    dicom_port: int | None = None,
    extra: Mapping[str, Any] | None = None,
    verbose: bool = False,
    start_timeout: float = 30.0,
) -> Iterator[OrthancPeer]:
    """Start an Orthanc on loopback with its config and data under `tmp_dir`; yield it once
    `/system` answers; stop it on exit."""
    if not Path(ORTHANC_BIN).exists():
        raise PeerError(f"Orthanc is not installed ({ORTHANC_BIN}); apt-get install orthanc orthanc-dicomweb")
    if dicomweb and not ORTHANC_DICOMWEB_PLUGIN.exists():
        raise PeerError(
            f"the DICOMweb plugin is missing ({ORTHANC_DICOMWEB_PLUGIN}); apt-get install orthanc-dicomweb"
        )
    base = Path(tmp_dir)
    base.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    cfg = orthanc_config(
        base,
        dicomweb=dicomweb,
        aet=aet,
        modalities=modalities,
        http_port=http_port,
        dicom_port=dicom_port,
        extra=extra,
    )
    for key in ("StorageDirectory", "IndexDirectory"):
        Path(cfg[key]).mkdir(parents=True, exist_ok=True)
    config_path = base / "orthanc.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    log_path = base / "orthanc.log"
    args = [ORTHANC_BIN, *(["--verbose"] if verbose else []), str(config_path)]
    with open(log_path, "wb") as log:
        # Own process group: Ctrl-C in the terminal reaches the test, which stops Orthanc itself.
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    url = f"http://{LOOPBACK}:{http_port}"
    peer = OrthancPeer(
        url=url,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=aet,
        host=LOOPBACK,
        config=cfg,
        config_path=config_path,
        storage_dir=Path(cfg["StorageDirectory"]),
        log_path=log_path,
        process=proc,
    )
    try:
        _wait_http(f"{url}/system", proc=proc, timeout=start_timeout, log_path=log_path)
        wait_for_port(dicom_port, proc=proc, timeout=start_timeout)
        yield peer
    finally:
        _stop(proc)


def _wait_http(url: str, *, proc: subprocess.Popen[Any], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PeerError(f"{url}: process exited with {proc.returncode}\n{_tail(log_path)}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
    _stop(proc)
    raise PeerError(f"{url} did not answer within {timeout:.0f}s ({last})\n{_tail(log_path)}")


# -- dcmtk ----------------------------------------------------------------------------------


def _dcmtk_exe(tool: str) -> str | None:
    """dcmtk's own binary: pynetdicom installs look-alike `storescu`/`findscu`/... scripts into
    the virtualenv's bin, which comes first on PATH, so look in the system folders only."""
    return shutil.which(tool, path=os.pathsep.join(("/usr/bin", "/usr/local/bin", "/bin")))


def dcmtk(
    tool: str, *args: str | os.PathLike[str], timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (echoscu, storescu, findscu, movescu, getscu, dcmdump, ...) to the end.

    Raises PeerError with the tool's output when it fails (check=True) or overruns `timeout`."""
    exe = _dcmtk_exe(tool)
    if exe is None:
        raise PeerError(f"dcmtk tool {tool!r} not found; apt-get install dcmtk")
    cmd = [exe, *map(str, args)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise PeerError(f"{tool} timed out after {timeout:.0f}s: {err or ''}") from exc
    if check and done.returncode != 0:
        raise PeerError(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class StoreSCP:
    """A running dcmtk storescp writing what it receives into `folder`."""

    folder: Path
    port: int
    aet: str
    host: str
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def log(self) -> str:
        return _tail(self.log_path)


@contextlib.contextmanager
def storescp(
    folder: Path | str,
    port: int | None = None,
    aet: str = "STORESCP",
    *,
    extra_args: Sequence[str] = (),
    start_timeout: float = 10.0,
) -> Iterator[StoreSCP]:
    """Run dcmtk's storescp in the background on loopback, accepting any SOP class and
    transfer syntax it knows, writing each instance as a file under `folder`."""
    exe = _dcmtk_exe("storescp")
    if exe is None:
        raise PeerError("dcmtk's storescp not found; apt-get install dcmtk")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = out.parent / f"storescp-{port}.log"
    # +xa: accept every transfer syntax storescp knows, not just the uncompressed ones.
    cmd = [exe, "--aetitle", aet, "--output-directory", str(out), "+xa", *extra_args, str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        wait_for_port(port, proc=proc, timeout=start_timeout)
        yield StoreSCP(folder=out, port=port, aet=aet, host=LOOPBACK, log_path=log_path, process=proc)
    finally:
        _stop(proc, grace=5)

"""A server killed outright (SIGKILL, the OOM killer) does not leave its parse worker processes
behind: they notice their parent is gone and exit, freeing their memory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from tests.dicomweb.data import multipart_body
from tests.identity.test_mllp_serve import scanonce_serve
from tests.support import auth_headers, make_ds, to_bytes


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_parse_workers_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    backend = SimpleNamespace(
        database_url=f"sqlite:///{tmp_path / 'index.db'}", storage_url=f"file://{tmp_path / 'objects'}"
    )
    study = "1.2.826.0.1.3680043.8.498.91"
    body, ctype = multipart_body([to_bytes(make_ds(sop=study + ".1.1", study=study, series=study + ".1"))])
    with scanonce_serve(
        tmp_path / "serve", backend, SCANONCE_MLLP_PORT="0", SCANONCE_INGEST_PROCESSES="1"
    ) as served:
        r = httpx.post(
            f"{served.url}/dicom-web/studies",
            content=body,
            headers={"Content-Type": ctype, **auth_headers()},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        workers = [
            p for p in _children(served.proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()
        ]
        assert workers, "the STOW-RS was parsed in a worker process"
        # Named in ps and top (its command line is the spawn's, like any other child's): what
        # bench/archive.py groups the server's CPU by.
        assert Path(f"/proc/{workers[0]}/comm").read_text().strip() == "scanonce-parse"
        # A worker imports the parser, not the whole broker (the console script, SQLAlchemy,
        # the web app): well under the serving process's size (it was ~95% of it).
        assert _rss_kb(workers[0]) < 0.7 * _rss_kb(served.proc.pid)
        # Nor numpy and Pillow, which pydicom loads when installed (~15 MB a worker).
        mapped = Path(f"/proc/{workers[0]}/maps").read_text()
        assert "/numpy" not in mapped and "/PIL/" not in mapped
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)

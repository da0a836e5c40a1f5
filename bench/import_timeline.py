"""Per-request timeline of the STOW-RS import beside the plain client (`bench/imports.py`'s
two sides): where the import's connections spend their time that the plain client's do not.

    .venv/bin/python -m bench.import_timeline --instances 200 --runs 6 [--verbose]

One Orthanc, one study; the import (`scanonce import --via dicomweb`: plan, coerce, send,
record, verify) and the same files POSTed unchanged by `delivery.Sender`s are run alternately,
Orthanc emptied before each. Probes wrap the functions involved (nothing in the broker changes):
each request's start (`delivery._stow` called), first and last body byte handed to the socket
(`delivery._body` yields), answer read; each instance's coercion (`service._spliced`), each
batch's record (`service._record`). Printed per side, medians over the requests of all runs
(ms): the first request after the run started, request start to first byte ("head"), first to
last byte ("body"), last byte to answer ("archive": Orthanc receiving the rest and storing, plus
the wait for the GIL to read the answer), a connection's answer to its next request ("gap");
and, for the import, its requests split by whether a coercion or a record ran while their body
was written. Run it on a quiet machine: a 2-core machine with other jobs moves the "archive"
column by tens of ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlmodel import Session

from bench.imports import _clear, _seed_outside, _study, _uid_of, _web
from broker.app import build_state
from broker.facilities import service as facilities
from broker.imports import delivery, service
from broker.settings import Settings
from tests.peers import orthanc
from tests.support import ADMIN

now = time.perf_counter
_Request = tuple[str, float, float, float, float]  # thread, start, first byte, last byte, answer
_Span = tuple[float, float]


class _Probes:
    """Events of the current run: requests (start, first byte, last byte, answer), coercions and
    records (start, end)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, float, float, float, float]] = []
        self.coercions: list[tuple[float, float]] = []
        self.records: list[tuple[float, float]] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def install(self) -> None:
        body, stow = delivery._body, delivery._stow
        spliced, record = service._spliced, service._record
        local = self._local

        def timed_body(*args: Any, **kwargs: Any) -> Iterator[bytes]:
            first = True
            for chunk in body(*args, **kwargs):
                if first:
                    local.first, first = now(), False
                yield chunk
            local.last = now()

        def timed_stow(*args: Any, **kwargs: Any) -> Any:
            local.first = local.last = 0.0
            t = now()
            out = stow(*args, **kwargs)
            with self._lock:
                self.requests.append((threading.current_thread().name, t, local.first, local.last, now()))
            return out

        def span(fn: Callable[..., Any], into: str) -> Callable[..., Any]:
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = now()
                try:
                    return fn(*args, **kwargs)
                finally:
                    with self._lock:
                        getattr(self, into).append((t, now()))  # the current run's list

            return timed

        setattr(delivery, "_body", timed_body)  # noqa: B010 - a probe over the module's own name
        setattr(delivery, "_stow", timed_stow)  # noqa: B010
        setattr(service, "_spliced", span(spliced, "coercions"))  # noqa: B010
        setattr(service, "_record", span(record, "records"))  # noqa: B010

    def take(self) -> tuple[list[_Request], list[_Span], list[_Span]]:
        with self._lock:
            out = (self.requests, self.coercions, self.records)
            self.requests, self.coercions, self.records = [], [], []
        return out


def _overlaps(a: float, b: float, spans: list[tuple[float, float]]) -> bool:
    """Whether `spans` (an instance's coercion each, ~0.1 ms) fill more than 0.5 ms of [a, b]."""
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in spans) > 0.0005


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=6, help="runs of each side, alternated")
    ap.add_argument("--verbose", action="store_true", help="every request of each side's last run")
    args = ap.parse_args()
    probes = _Probes()
    probes.install()
    with tempfile.TemporaryDirectory(prefix="bench-import-timeline-") as tmpdir:
        tmp = Path(tmpdir)
        st = build_state(Settings(data_dir=tmp / "broker", mllp_port=0))
        with orthanc(tmp / "pacs", aet="MYPACS") as pacs:
            with Session(st.engine) as session:
                facilities.add_facility(session=session, principal=ADMIN, facility_id="mine", issuer="MYPACS",
                                        dicomweb_url=pacs.dicomweb_url)  # fmt: skip
                facilities.add_facility(
                    session=session, principal=ADMIN, facility_id="outside", issuer="OUTHOSP"
                )
            (tmp / "src").mkdir()
            paths = _study(tmp / "src", args.instances, args.size)
            _seed_outside(st, paths)
            study_uid = _uid_of(paths[0])
            sops = {p: _uid_of(p, sop=True) for p in paths}

            def imp() -> None:
                row, job = service.start_claimed(engine=st.engine, principal=ADMIN, study_uid=study_uid,
                                             facility_id="mine", via="dicomweb")  # fmt: skip
                final = service.run_claimed(engine=st.engine, store=st.store, import_id=row.id or 0, job=job)
                assert final.status == "done", final.message

            def plain() -> None:
                batches = [paths[i : i + service.BATCH] for i in range(0, len(paths), service.BATCH)]
                senders = [delivery.Sender(facility=_web(pacs), via="dicomweb", calling_ae="X")
                           for _ in range(service.SENDERS)]  # fmt: skip

                def send(k: int) -> None:
                    for batch in batches[k :: service.SENDERS]:
                        assert all(o.status == "sent" for o in senders[k].send([(p, sops[p]) for p in batch]))

                with ThreadPoolExecutor(service.SENDERS) as pool:
                    list(pool.map(send, range(service.SENDERS)))
                for sender in senders:
                    sender.close()

            cols: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            walls: dict[str, list[float]] = defaultdict(list)
            for _ in range(args.runs):
                for side, run in (("import", imp), ("plain client", plain)):
                    _clear(pacs.url)
                    probes.take()
                    t0 = now()
                    run()
                    walls[side].append(now() - t0)
                    requests, coercions, records = probes.take()
                    c = cols[side]
                    c["first request"].append(min(r[1] for r in requests) - t0)
                    by_thread: dict[str, list[tuple[str, float, float, float, float]]] = defaultdict(list)
                    for r in requests:
                        by_thread[r[0]].append(r)
                        c["head"].append(r[2] - r[1])
                        c["body"].append(r[3] - r[2])
                        c["archive"].append(r[4] - r[3])
                        if side == "import":
                            co, rec = _overlaps(r[1], r[3], coercions), _overlaps(r[1], r[3], records)
                            which = (
                                ("both" if rec else "coercion") if co else ("record" if rec else "neither")
                            )
                            c[f"head+body beside {which}"].append(r[3] - r[1])
                    for mine in by_thread.values():
                        mine.sort(key=lambda r: r[1])
                        c["gap"] += [b[1] - a[4] for a, b in zip(mine, mine[1:], strict=False)]
                    if args.verbose and len(walls[side]) == args.runs:
                        print(
                            f"{side}, last run (ms from its start): request start, first byte, last byte, "
                            "answer"
                        )
                        for r in sorted(requests, key=lambda r: r[1]):
                            print(f"  {r[0]:>16} " + "  ".join(f"{1000 * (x - t0):7.1f}" for x in r[1:]))
            print(f"{args.instances} instances, batches of {service.BATCH}, {service.SENDERS} at once; "
                  f"{args.runs} runs of each side, alternated; medians (ms), n = how many")  # fmt: skip
            for side, c in cols.items():
                print(f"{side}: run {1000 * statistics.median(walls[side]):.0f}; " + "; ".join(
                    f"{k} {1000 * statistics.median(v):.1f} (n={len(v)})" for k, v in c.items()))  # fmt: skip


if __name__ == "__main__":
    main()

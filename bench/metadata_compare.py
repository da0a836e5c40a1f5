"""Study metadata (WADO-RS) of ScanOnce and Orthanc for the same instances, attribute by attribute.

Both servers receive the same generated instances (the archive benchmark's generator, or any
files given); the script prints, per attribute, how each server encodes it (a Value, a
BulkDataURI, InlineBinary, or absent) and where the values differ, and the size of each
response. It answers "why is one metadata response larger than the other".

    .venv/bin/python -m bench.metadata_compare                # 20 generated CT instances
    .venv/bin/python -m bench.metadata_compare --rows 512 -n 20
    .venv/bin/python -m bench.metadata_compare FILE...         # your own (synthetic) files
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
from pydicom.datadict import keyword_for_tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.settings import Settings  # noqa: E402
from tests.dicomweb.conftest import serve  # noqa: E402
from tests.dicomweb.data import multipart_body  # noqa: E402
from tests.peers import orthanc  # noqa: E402


def _form(item: dict[str, Any] | None) -> str:
    if item is None:
        return "absent"
    for key in ("BulkDataURI", "InlineBinary", "Value"):
        if key in item:
            return key
    return "empty"


def _strip_uris(value: Any) -> Any:
    """Values with server-specific URIs blanked, so that equal content compares equal."""
    if isinstance(value, dict):
        return {k: ("<uri>" if k == "BulkDataURI" else _strip_uris(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_uris(v) for v in value]
    return value


def compare(so: list[dict[str, Any]], oc: list[dict[str, Any]]) -> list[tuple[str, str, str, str, int]]:
    """Rows (tag, ScanOnce form, Orthanc form, note, instances) over instances matched by SOP UID."""
    by_sop = {m["00080018"]["Value"][0]: m for m in oc}
    rows: Counter[tuple[str, str, str, str]] = Counter()
    for a in so:
        b = by_sop.get(a["00080018"]["Value"][0])
        if b is None:
            continue
        for tag in sorted(set(a) | set(b)):
            fa, fb = _form(a.get(tag)), _form(b.get(tag))
            note = ""
            if fa == fb == "Value" and _strip_uris(a[tag]) != _strip_uris(b[tag]):
                note = f"values differ: {str(a[tag]['Value'])[:50]} vs {str(b[tag]['Value'])[:50]}"
            if fa == fb and not note and a.get(tag, {}).get("vr") == b.get(tag, {}).get("vr"):
                continue
            if a.get(tag, {}).get("vr") != b.get(tag, {}).get("vr") and fa != "absent" and fb != "absent":
                note = (note + f" vr {a[tag]['vr']} vs {b[tag]['vr']}").strip()
            rows[(tag, fa, fb, note)] += 1
    return [(tag, fa, fb, note, n) for (tag, fa, fb, note), n in sorted(rows.items())]


def _into_one_study(path: Path) -> bytes:
    """The file re-labelled into one study, so that one metadata request covers them all."""
    import io

    from pydicom import dcmread

    ds = dcmread(path)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1077.777"
    ds.PatientID = "CMP-1"  # Orthanc keys a study by patient too: one patient, one study
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("-n", type=int, default=20, help="generated instances (one series)")
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args(argv)
    if args.files:
        blobs = []
        for path in args.files:
            try:
                blobs.append(_into_one_study(path))
            except Exception as exc:  # noqa: BLE001 - a file both servers would refuse is skipped
                print(f"skipped {path.name}: {type(exc).__name__}", file=sys.stderr)
    else:
        from bench.archive import instances

        generated = instances(
            seed=12, n_studies=1, series_per_study=1, instances_per_series=args.n, rows=args.rows
        )
        blobs = list(generated)
    import io

    from pydicom import dcmread

    study = str(dcmread(io.BytesIO(blobs[0]), stop_before_pixels=True).StudyInstanceUID)
    body, ctype = multipart_body(blobs)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        peer = stack.enter_context(orthanc(Path(tmp) / "orthanc"))
        settings = Settings(data_dir=Path(tmp) / "broker", dimse_port=0, mllp_port=0)
        broker = stack.enter_context(serve(settings))
        sizes = {}
        metas = {}
        with httpx.Client(timeout=120) as http:
            for name, base in (("ScanOnce", broker.url), ("Orthanc", peer.dicomweb_url)):
                r = http.post(f"{base}/studies", content=body, headers={"Content-Type": ctype})
                if r.status_code != 200:
                    print(f"{name} STOW-RS: HTTP {r.status_code} {r.text[:300]}", file=sys.stderr)
                r = http.get(f"{base}/studies/{study}/metadata", headers={"Accept": "application/dicom+json"})
                r.raise_for_status()
                sizes[name] = len(r.content)
                metas[name] = r.json()
    print(f"{len(metas['ScanOnce'])} instances (ScanOnce), {len(metas['Orthanc'])} (Orthanc)")
    for name, meta in metas.items():
        # Orthanc indents its JSON; the compact size tells formatting from content.
        compact = len(orjson.dumps(meta))
        attrs = sum(len(m) for m in meta)
        print(f"{name}: {sizes[name]:,} bytes as served, {compact:,} compact, {attrs} top-level attributes")
    print()
    print("| tag | keyword | ScanOnce | Orthanc | note | instances |")
    print("|---|---|---|---|---|---|")
    for tag, fa, fb, note, count in compare(metas["ScanOnce"], metas["Orthanc"]):
        keyword = keyword_for_tag(int(tag, 16)) or ("private" if int(tag[:4], 16) % 2 else "")
        print(f"| {tag} | {keyword} | {fa} | {fb} | {note} | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

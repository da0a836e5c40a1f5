"""The SCP end to end on both backends: SQLite + local folder, and PostgreSQL + S3 (moto server)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pydicom

from broker.demo import synth
from tests.dimse.conftest import TEST_FILES, Node, _start, synthetic_studies
from tests.peers import dcmtk, storescp


def test_store_find_move_on_each_backend(backend: Any, tmp_path: Path) -> None:
    nodes: Generator[Node, None, None] = _start(
        tmp_path / "node", database_url=backend.database_url, storage_url=backend.storage_url
    )
    node = next(nodes)
    try:
        study = [ds for ds in synthetic_studies() if ds.Modality == "MR"]
        paths = synth.write_files(study, tmp_path / "send")
        where = ["-aec", node.aet, "127.0.0.1", str(node.port)]
        dcmtk("storescu", "-aet", "PACS1", *where, *paths)
        compressed = TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm"
        dcmtk("storescu", "-aet", "PACS1", "-xy", *where, compressed)

        out = tmp_path / "found"
        out.mkdir()
        keys = ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study[0].StudyInstanceUID}"]
        dcmtk("findscu", "-aet", "PACS1", "-S", "-X", "-od", out, *keys, "-k", "SeriesInstanceUID", *where)
        found = {pydicom.dcmread(p).SeriesInstanceUID for p in out.glob("rsp*.dcm")}
        assert found == {ds.SeriesInstanceUID for ds in study}

        original = pydicom.dcmread(compressed)
        with storescp(tmp_path / "sink", aet="SINKAE") as sink:
            node.peers.add_destination("SINKAE", "127.0.0.1", sink.port)
            for uid in (study[0].StudyInstanceUID, original.StudyInstanceUID):
                dcmtk("movescu", "-aet", "PACS1", "-aem", "SINKAE", "-S", "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"StudyInstanceUID={uid}", *where)  # fmt: skip
            received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in sink.files()}
        assert set(received) == {ds.SOPInstanceUID for ds in study} | {original.SOPInstanceUID}
        got = received[original.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert got.PixelData == original.PixelData
    finally:
        nodes.close()

"""WADO-RS against a loaded live broker: instances, metadata, bulk data, frames, rendered."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from tests.dicomweb.conftest import Archive, LiveServer
from tests.dicomweb.data import MUELLER, MULLER, NORTH_FACILITY, SMITH, multipart_body, split_multipart, uid
from tests.support import QUADRANTS, make_ds, quadrant_ds, quadrant_pixels, to_bytes

EXPLICIT_LE = "1.2.840.10008.1.2.1"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _get(archive: Archive, path: str, **headers: str) -> requests.Response:
    with archive.server.http() as http:
        return http.get(path, headers=headers)  # type: ignore[return-value]


def _instance_path(study: str, series: str, sop: str) -> str:
    return f"/dicom-web/studies/{study}/series/{series}/instances/{sop}"


def test_study_retrieve_defaults_to_explicit_little_endian_without_loss(archive: Archive) -> None:
    client = archive.server.client()
    datasets = client.retrieve_study(MUELLER)
    assert {d.SOPInstanceUID for d in datasets} == {i.sop for i in archive.corpus.study(MUELLER)}
    assert {str(d.file_meta.TransferSyntaxUID) for d in datasets} == {EXPLICIT_LE}
    for ds in datasets:
        original = pydicom.dcmread(archive.corpus.sop(ds.SOPInstanceUID).path)
        assert np.array_equal(ds.pixel_array, original.pixel_array), ds.SOPInstanceUID
    # Big endian and implicit VR are transcoded too.
    series = client.retrieve_series(MULLER, uid(2, 1))
    assert {str(d.file_meta.TransferSyntaxUID) for d in series} == {EXPLICIT_LE}
    assert np.array_equal(
        series[0].pixel_array, pydicom.dcmread(archive.corpus.sop(series[0].SOPInstanceUID).path).pixel_array
    )


def test_lossy_study_comes_as_stored_by_default_and_not_as_explicit_little_endian(archive: Archive) -> None:
    # PS3.18 8.7.3.4: pixel data held only in lossy form is returned in the syntax it was received in.
    (item,) = archive.corpus.study(SMITH)
    for accept in ('multipart/related; type="application/dicom"', AS_STORED):
        r = _get(archive, f"/dicom-web/studies/{SMITH}", Accept=accept)
        assert r.status_code == 200, accept
        ((headers, data),) = split_multipart(r.headers["content-type"], r.content)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={item.transfer_syntax}"
        assert hashlib.sha256(data).hexdigest() == item.sha256
    # Asked for explicitly, Explicit VR Little Endian cannot be had without decompressing lossy data.
    r = _get(
        archive,
        f"/dicom-web/studies/{SMITH}",
        Accept=f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}',
    )
    assert r.status_code == 406
    assert "transfer-syntax=*" in r.json()["detail"]


def test_as_stored_is_byte_for_byte(archive: Archive) -> None:
    r = _get(archive, f"/dicom-web/studies/{MUELLER}", Accept=AS_STORED)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = split_multipart(r.headers["content-type"], r.content)
    want = {i.sha256 for i in archive.corpus.study(MUELLER)}
    assert {hashlib.sha256(data).hexdigest() for _, data in parts} == want


def test_unacceptable_media_types_are_406(archive: Archive) -> None:
    path = f"/dicom-web/studies/{MUELLER}"
    for accept in (
        "application/dicom+json",
        "image/png",
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
    ):
        r = _get(archive, path, Accept=accept)
        assert r.status_code == 406, accept


def test_unknown_and_invalid_uids(archive: Archive) -> None:
    unknown = "1.2.3.4.5.6.7.8.9"
    assert _get(archive, f"/dicom-web/studies/{unknown}").status_code == 404
    assert _get(archive, f"/dicom-web/studies/{MUELLER}/series/{unknown}").status_code == 404
    assert _get(archive, _instance_path(MUELLER, uid(1, 1), unknown)).status_code == 404
    assert _get(archive, f"/dicom-web/studies/{unknown}/metadata").status_code == 404
    # A string that is not a UID names no resource (PS3.18: 404), never a key or a query.
    for bad in ("abc", "1.2.03", "1..2", "%2E%2E", "1.2.3%00"):
        r = _get(archive, f"/dicom-web/studies/{bad}/metadata")
        assert r.status_code == 404, (bad, r.status_code)
        assert "UID" in r.json()["detail"]
    r = _get(archive, f"/dicom-web/studies/{MUELLER}/series/..%2F..%2Fetc/metadata")
    assert r.status_code == 404
    # A study of another facility is not found through this facility's partition.
    north = archive.corpus.by_facility()[NORTH_FACILITY][0].study
    assert _get(archive, f"/facilities/local/dicom-web/studies/{north}/metadata").status_code == 404
    assert (
        _get(archive, f"/facilities/{NORTH_FACILITY}/dicom-web/studies/{north}/metadata").status_code == 200
    )


def test_metadata_levels_and_bulk_data(archive: Archive) -> None:
    client = archive.server.client()
    study = client.retrieve_study_metadata(MUELLER)
    assert len(study) == 4
    assert len(client.retrieve_series_metadata(MUELLER, uid(1, 2))) == 2
    (ct,) = [m for m in study if m["00080018"]["Value"] == [uid(1, 1, 1)]]
    instance = client.retrieve_instance_metadata(MUELLER, uid(1, 1), uid(1, 1, 1))
    assert instance == ct
    pixel_uri = ct["7FE00010"]["BulkDataURI"]
    assert (
        pixel_uri
        == f"{archive.server.url}/studies/{MUELLER}/series/{uid(1, 1)}/instances/{uid(1, 1, 1)}/bulk/7FE00010"
    )
    r = _get(archive, pixel_uri.removeprefix(archive.server.origin))
    assert r.status_code == 200
    ((headers, data),) = split_multipart(r.headers["content-type"], r.content)
    assert headers["content-type"] == "application/octet-stream"
    assert data == pydicom.dcmread(archive.corpus.sop(uid(1, 1, 1)).path).PixelData
    assert client.retrieve_bulkdata(pixel_uri) == [data]
    assert _get(archive, pixel_uri.removeprefix(archive.server.origin)[:-8] + "7FE0001Z").status_code == 400
    assert _get(archive, pixel_uri.removeprefix(archive.server.origin)[:-8] + "00091234").status_code == 404
    # Items are numbered from 1 (PS3.19): item 0 is a malformed path, not a missing value.
    r = _get(archive, pixel_uri.removeprefix(archive.server.origin)[:-8] + "00081140/0/00081150")
    assert r.status_code == 400, r.text
    assert (
        _get(archive, pixel_uri.removeprefix(archive.server.origin)[:-8] + "00081140/1/00081150").status_code
        == 404
    )


def test_frames_uncompressed_and_as_stored(archive: Archive) -> None:
    client = archive.server.client()
    rgb = archive.corpus.sop(uid(1, 3, 1))  # 2-frame RGB, RLE Lossless
    original = pydicom.dcmread(rgb.path)
    frames = client.retrieve_instance_frames(
        MUELLER, uid(1, 3), uid(1, 3, 1), frame_numbers=[2, 1], media_types=("application/octet-stream",)
    )
    assert len(frames) == 2
    expected = original.pixel_array  # (frames, rows, cols, 3)
    assert (
        np.frombuffer(frames[0], dtype=np.uint8).reshape(expected.shape[1:]).tolist() == expected[1].tolist()
    )
    path = _instance_path(MUELLER, uid(1, 3), uid(1, 3, 1)) + "/frames/1"
    r = _get(archive, path, Accept="multipart/related; type=image/dicom-rle")
    assert r.status_code == 200
    ((headers, data),) = split_multipart(r.headers["content-type"], r.content)
    assert headers["content-type"].startswith("image/dicom-rle")
    assert len(data) < len(frames[1])  # the compressed bitstream, not pixels
    # A client that takes any part type (dicomweb-client's default, type="*/*") gets them as stored.
    (default,) = client.retrieve_instance_frames(MUELLER, uid(1, 3), uid(1, 3, 1), frame_numbers=[1])
    assert default == data
    # OHIF's request: octet-stream with transfer-syntax=* -> the stored bytes, labelled as asked.
    r = _get(archive, path, Accept="multipart/related; type=application/octet-stream; transfer-syntax=*")
    ((headers, same),) = split_multipart(r.headers["content-type"], r.content)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={rgb.transfer_syntax}"
    assert same == data
    assert _get(archive, path, Accept="multipart/related; type=image/jp2").status_code == 406
    assert _get(archive, path.replace("frames/1", "frames/3")).status_code == 404  # past the last frame
    assert _get(archive, path.replace("frames/1", "frames/0")).status_code == 400
    assert _get(archive, path.replace("frames/1", "frames/1,x")).status_code == 400


def test_frames_take_the_best_range_in_accept_the_stored_instance_can_meet(archive: Archive) -> None:
    # RFC 9110 12.5.1 and PS3.18 8.7.8: a range the instance cannot meet (JPEG for an RLE
    # instance) gives way to the next acceptable one; 406 only when none is left.
    path = _instance_path(MUELLER, uid(1, 3), uid(1, 3, 1)) + "/frames/1"  # RLE Lossless
    rle = _get(archive, path, Accept="multipart/related; type=image/dicom-rle")
    native = _get(archive, path, Accept="multipart/related; type=application/octet-stream")
    for accept, expected in (
        ("multipart/related; type=image/jpeg, multipart/related; type=image/dicom-rle; q=0.9", rle),
        (
            "multipart/related; type=image/jpeg, multipart/related; type=application/octet-stream; q=0.5",
            native,
        ),
    ):
        r = _get(archive, path, Accept=accept)
        assert r.status_code == 200, (accept, r.text)
        got = split_multipart(r.headers["content-type"], r.content)
        assert got == split_multipart(expected.headers["content-type"], expected.content), accept
    assert _get(archive, path, Accept="multipart/related; type=image/jpeg").status_code == 406


def test_frames_as_octet_stream_in_a_compressed_syntax_are_406_not_native_pixels(archive: Archive) -> None:
    # PS3.18 8.7.3.3.1: octet-stream is uncompressed bulk data, Explicit VR Little Endian; a
    # compressed transfer syntax under it cannot be served, and native pixels are not what was asked.
    path = _instance_path(MUELLER, uid(1, 3), uid(1, 3, 1)) + "/frames/1"
    octet = "multipart/related; type=application/octet-stream"
    r = _get(archive, path, Accept=f"{octet}; transfer-syntax=1.2.840.10008.1.2.4.50")
    assert r.status_code == 406, r.headers.get("content-type")
    assert "transfer-syntax" in r.json()["detail"]
    # The next acceptable range is taken, and Explicit VR Little Endian by name is the default.
    r = _get(archive, path, Accept=f"{octet}; transfer-syntax=1.2.840.10008.1.2.4.50, {octet}; q=0.5")
    assert r.status_code == 200
    explicit = _get(archive, path, Accept=f"{octet}; transfer-syntax={EXPLICIT_LE}")
    ((headers, data),) = split_multipart(explicit.headers["content-type"], explicit.content)
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert [data] == [d for _, d in split_multipart(r.headers["content-type"], r.content)]


@pytest.mark.parametrize("media_type", ["image/jpeg", "image/png"])
def test_rendered_and_thumbnail(archive: Archive, media_type: str) -> None:
    path = _instance_path(MUELLER, uid(1, 1), uid(1, 1, 1))
    r = _get(archive, path + "/rendered?window=40,400&viewport=64,64&quality=80", Accept=media_type)
    assert r.status_code == 200
    assert r.headers["content-type"] == media_type
    image = Image.open(io.BytesIO(r.content))
    assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[media_type]
    assert max(image.size) == 64
    narrow = _get(archive, path + "/rendered?window=40,10", Accept=media_type)
    wide = _get(archive, path + "/rendered?window=40,4000", Accept=media_type)
    assert narrow.content != wide.content  # the window changes the picture
    via_client = archive.server.client().retrieve_instance_rendered(
        MUELLER, uid(1, 1), uid(1, 1, 1), media_types=(media_type,), params={"viewport": "32,32"}
    )
    assert max(Image.open(io.BytesIO(via_client)).size) == 32
    rgb = _get(
        archive, _instance_path(MUELLER, uid(1, 3), uid(1, 3, 1)) + "/frames/2/rendered", Accept=media_type
    )
    assert rgb.status_code == 200
    assert Image.open(io.BytesIO(rgb.content)).mode == "RGB"
    for thumb in (f"/dicom-web/studies/{MUELLER}/thumbnail", path + "/thumbnail"):
        r = _get(archive, thumb, Accept=media_type)
        assert r.status_code == 200, thumb
        assert max(Image.open(io.BytesIO(r.content)).size) <= 128


def test_a_study_thumbnail_is_of_an_image_when_the_middle_instance_has_no_pixels(
    live_server: LiveServer,
) -> None:
    # A CT series, a series without pixels (a report, a plan) and another CT series: the middle
    # instance is the one without pixels, yet the study has images to show.
    study = uid(90)
    instances = [make_ds(sop=uid(90, n, 1), study=study, series=uid(90, n)) for n in (1, 2, 3)]
    for n, ds in enumerate(instances, 1):
        ds.SeriesNumber = n
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(instances[1], keyword)
    body, ctype = multipart_body([to_bytes(ds) for ds in instances])
    with live_server.http() as http:
        assert (
            http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        )
        r = http.get(f"/dicom-web/studies/{study}/thumbnail", headers={"Accept": "image/png"})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).format == "PNG"
        # A series with nothing to show still has no thumbnail.
        r = http.get(f"/dicom-web/studies/{study}/series/{uid(90, 2)}/thumbnail")
        assert r.status_code == 406


def test_rendered_study_and_series_are_one_image_per_instance(archive: Archive) -> None:
    r = _get(archive, f"/dicom-web/studies/{MUELLER}/rendered?viewport=16,16", Accept="image/png")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="image/png"')
    parts = split_multipart(r.headers["content-type"], r.content)
    assert len(parts) == 4
    assert all(Image.open(io.BytesIO(data)).format == "PNG" for _, data in parts)
    r = _get(archive, f"/dicom-web/studies/{MULLER}/series/{uid(2, 1)}/rendered")
    assert len(split_multipart(r.headers["content-type"], r.content)) == 2


def test_rendered_viewport_source_region_crops_flips_and_scales(live_server: LiveServer) -> None:
    # PS3.18 8.3.5.1.3 viewport=vw,vh,sx,sy,sw,sh on a 60 x 40 image of four flat 30 x 20
    # quadrants: PNG is lossless, so each answer can be compared pixel for pixel.
    study, series, sop = uid(91), uid(91, 1), uid(91, 1, 1)
    body, ctype = multipart_body([to_bytes(quadrant_ds(sop=sop, study=study, series=series))])
    whole = quadrant_pixels()
    instance = _instance_path(study, series, sop)
    with live_server.http() as http:
        assert (
            http.post("/dicom-web/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        )

        def png(path: str) -> np.ndarray:
            r = http.get(path, headers={"Accept": "image/png"})
            assert r.status_code == 200, (path, r.text)
            return np.asarray(Image.open(io.BytesIO(r.content)))

        # One quadrant, from the instance and from its frame.
        assert np.array_equal(png(f"{instance}/rendered?viewport=30,20,30,0,30,20"), whole[:20, 30:])
        assert np.array_equal(
            png(f"{instance}/frames/1/rendered?viewport=30,20,30,20,30,20"), whole[20:, 30:]
        )
        # Omitted components take their defaults: sx, sy 0, sw, sh to the image's edge.
        assert np.array_equal(png(f"{instance}/rendered?viewport=60,20,,20,,"), whole[20:, :])
        assert np.array_equal(png(f"{instance}/rendered?viewport=30,40,,,30,"), whole[:, :30])
        # A negative sw mirrors the region left to right, a negative sh upside down.
        flipped = png(f"{instance}/rendered?viewport=60,20,0,0,-60,20")
        assert np.array_equal(flipped, whole[:20, ::-1])
        assert (flipped[0, 0], flipped[0, -1]) == (QUADRANTS[1], QUADRANTS[0])
        assert np.array_equal(png(f"{instance}/rendered?viewport=30,40,0,0,30,-40"), whole[::-1, :30])
        # Scaled to fit the viewport, its aspect kept: a 30 x 20 region in 100 x 100 is 100 x 67.
        zoomed = png(f"{instance}/rendered?viewport=100,100,0,0,30,20")
        assert zoomed.shape == (67, 100) and set(np.unique(zoomed)) == {QUADRANTS[0]}
        # A study or series renders each instance's region.
        r = http.get(
            f"/dicom-web/studies/{study}/rendered?viewport=30,20,0,20,30,20", headers={"Accept": "image/png"}
        )
        ((_, data),) = split_multipart(r.headers["content-type"], r.content)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), whole[20:, :30])

        def refused(path: str) -> str:
            r = http.get(path)
            assert r.status_code == 400, (path, r.status_code)
            detail: str = r.json()["detail"]
            return detail

        for query, problem in (
            ("viewport=64,64,0,0,30", "5 values"),
            ("viewport=64,64,0,0,30,20,1", "7 values"),
            ("viewport=64,64,a,0,30,20", "sx must be an integer"),
            ("viewport=64,64,0,0,1.5,20", "sw must be an integer"),
            ("viewport=64,64,0,0,0,20", "sw and sh (the source region's width and height) must not be 0"),
            ("viewport=64,64,-1,0,30,20", "must not be negative"),
            ("viewport=0,64,0,0,30,20", "between 1 and 8192"),
            ("viewport=,64,0,0,30,20", "vw and vh"),
            ("viewport=64,64,50,0,20,20", "columns 50 to 69 (sx, sw), reaches past the image's 60 columns"),
            ("viewport=64,64,0,30,10,-20", "rows 30 to 49 (sy, sh), reaches past the image's 40 rows"),
            ("viewport=64,64,60,0,,", "(sx, sy) = (60, 0) is outside the 60 x 40 image"),
        ):
            assert problem in refused(f"{instance}/rendered?{query}"), query
        # At the study level too, when the region fits none of its images (not an empty 200).
        assert "reaches past" in refused(f"/dicom-web/studies/{study}/rendered?viewport=64,64,50,0,20,20")
        # A thumbnail is of an image the server picks: pixel coordinates in it are refused.
        assert "thumbnail" in refused(f"/dicom-web/studies/{study}/thumbnail?viewport=64,64,0,0,30,20")
        assert http.get(f"/dicom-web/studies/{study}/thumbnail?viewport=64,64").status_code == 200
        # A thumbnail fits inside vw x vh, its aspect kept, as a rendering does (it was fit inside
        # a square of the larger side: 40 x 27 for 30,40, taller than asked for).
        for query, size in (("viewport=30,40", (30, 20)), ("viewport=64,16", (24, 16))):
            r = http.get(f"/dicom-web/studies/{study}/thumbnail?{query}", headers={"Accept": "image/png"})
            assert r.status_code == 200, (query, r.status_code)
            assert Image.open(io.BytesIO(r.content)).size == size, query


def test_rendered_window_function_is_applied(archive: Archive) -> None:
    # PS3.18 8.3.5.1.3: window=center,width,function; the function changes the picture.
    path = _instance_path(MUELLER, uid(1, 1), uid(1, 1, 1)) + "/rendered"
    linear = _get(archive, f"{path}?window=40,400,linear", Accept="image/png")
    sigmoid = _get(archive, f"{path}?window=40,400,sigmoid", Accept="image/png")
    assert linear.status_code == sigmoid.status_code == 200
    assert linear.content == _get(archive, f"{path}?window=40,400", Accept="image/png").content
    assert sigmoid.content != linear.content
    assert sigmoid.content == _get(archive, f"{path}?window=40,400,SIGMOID", Accept="image/png").content
    # A function PS3.18 does not define is a bad parameter, not silently linear; so at the
    # study level, where it would otherwise leave every image out of a 200.
    for where in (path, f"/dicom-web/studies/{MUELLER}/rendered"):
        r = _get(archive, f"{where}?window=40,400,gamma")
        assert r.status_code == 400, where
        assert "function" in r.json()["detail"]


def test_rendered_study_and_series_take_the_multipart_accept_ps3_18_prescribes(archive: Archive) -> None:
    # PS3.18 10.4.4: a Rendered Study or Series is multipart; its Accept names the part type.
    series = f"/dicom-web/studies/{MULLER}/series/{uid(2, 1)}/rendered"
    for path, n in ((f"/dicom-web/studies/{MUELLER}/rendered", 4), (series, 2)):
        for accept, part in (
            ('multipart/related; type="image/png"', "image/png"),
            ("multipart/related; type=image/gif, image/png;q=0.5", "image/gif"),
            ("multipart/related", "image/jpeg"),
            ('multipart/related; type="image/*"', "image/jpeg"),
        ):
            r = _get(archive, f"{path}?viewport=16,16", Accept=accept)
            assert r.status_code == 200, (path, accept, r.text)
            assert r.headers["content-type"].startswith(f'multipart/related; type="{part}"'), accept
            assert len(split_multipart(r.headers["content-type"], r.content)) == n
        r = _get(archive, path, Accept='multipart/related; type="image/tiff"')
        assert r.status_code == 406, r.text


def test_rendered_bad_parameters(archive: Archive) -> None:
    path = _instance_path(MUELLER, uid(1, 1), uid(1, 1, 1)) + "/rendered"
    assert _get(archive, path, Accept="image/tiff").status_code == 406
    for query in (
        *("window=abc", "window=40,-1", "viewport=0,10", "viewport=a,b", "quality=101", "quality=x"),
        *(
            "window=nan,400",
            "window=40,inf",
            "window=40,1e400",
            "window=-inf,400",
        ),  # not numbers a window has
    ):
        r = _get(archive, f"{path}?{query}")
        assert r.status_code == 400, query
        assert r.json()["detail"]

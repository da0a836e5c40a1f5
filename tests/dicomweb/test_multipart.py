"""The multipart/related reader and writer on their own: streaming, limits, Content-Type rules."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from broker.dicomweb.multipart import (
    ReceivedParts,
    parse_accept,
    receive_parts,
    related_boundary,
    related_stream,
)
from broker.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from tests.dicomweb.data import multipart_body, split_multipart


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _receive(body: bytes, boundary: str, *, limit: int = 1 << 30, chunk: int = 65536) -> list[bytes]:
    async def run() -> list[bytes]:
        async with ReceivedParts() as received:
            await receive_parts(_chunks(body, chunk), boundary=boundary, max_part_bytes=limit, into=received)
            out = []
            for part in received.parts:
                with open(part.path, "rb") as f:
                    out.append(f.read())
                assert part.size == len(out[-1])
            paths = [p.path for p in received.parts]
        assert not any(os.path.exists(p) for p in paths)  # temp files are gone afterwards
        return out

    return asyncio.run(run())


def test_parts_come_out_byte_for_byte_whatever_the_chunking() -> None:
    parts = [os.urandom(100_000), b"", b"--not-a-boundary\r\n" * 3, os.urandom(7)]
    body, ctype = multipart_body(parts, boundary="edge")
    boundary = related_boundary(ctype)
    for chunk in (1, 7, 4096, 1 << 20):
        assert _receive(body, boundary, chunk=chunk) == parts


def test_a_large_body_is_streamed_to_disk_not_held_in_memory() -> None:
    part = os.urandom(8 << 20)
    body, _ = multipart_body([part, part, part], boundary="big")
    tracemalloc.start()
    try:
        got = asyncio.run(_count_parts(body))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == 3
    assert peak < 2 << 20, f"peak allocation {peak} bytes while receiving {len(body)}"


async def _count_parts(body: bytes) -> int:
    async with ReceivedParts() as received:
        await receive_parts(_chunks(body), boundary="big", max_part_bytes=1 << 30, into=received)
        return len(received.parts)


def test_part_limit_and_broken_bodies() -> None:
    body, _ = multipart_body([b"x" * 5000], boundary="b")
    with pytest.raises(PayloadTooLarge):
        _receive(body, "b", limit=4999)
    assert _receive(body, "b", limit=5000) == [b"x" * 5000]
    for broken in (b"", b"garbage", b"--b\r\nContent-Type: application/dicom\r\n\r\nunterminated"):
        with pytest.raises(BadRequest):
            _receive(broken, "b")


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc', "abc"),
        ("multipart/related; type=application/dicom; boundary=abc", "abc"),
        ('MULTIPART/RELATED; boundary="a;b=c"; type="Application/DICOM"', "a;b=c"),
        ("multipart/related; boundary=abc", "abc"),  # no type: each part speaks for itself
    ],
)
def test_related_content_types_accepted(content_type: str, boundary: str) -> None:
    assert related_boundary(content_type) == boundary


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        (None, UnsupportedMediaType),
        ("application/dicom", UnsupportedMediaType),
        ("multipart/mixed; boundary=abc", UnsupportedMediaType),
        ('multipart/related; type="application/dicom+xml"; boundary=abc', UnsupportedMediaType),
        ('multipart/related; type="application/dicom"', BadRequest),
        ('multipart/related; type="application/dicom"; boundary=""', BadRequest),
    ],
)
def test_related_content_types_refused(content_type: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        related_boundary(content_type)


def test_writer_output_parses_back() -> None:
    parts = [
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", [b"ab", b"", b"cd"]),
        ("application/dicom", [b"\r\n--x"]),
    ]
    body = b"".join(related_stream(parts, boundary="x-y"))
    got = split_multipart('multipart/related; type="application/dicom"; boundary=x-y', body)
    assert [(h["content-type"], d) for h, d in got] == [(parts[0][0], b"abcd"), (parts[1][0], b"\r\n--x")]


def test_accept_ranges_are_ordered_by_quality() -> None:
    ranges = parse_accept(
        'image/png;q=0.5, multipart/related; type="application/dicom"; transfer-syntax=*, */*;q=0'
    )
    assert [r.type for r in ranges] == ["multipart/related", "image/png"]
    assert ranges[0].params == {"type": "application/dicom", "transfer-syntax": "*"}
    assert [r.type for r in parse_accept(None)] == ["*/*"]

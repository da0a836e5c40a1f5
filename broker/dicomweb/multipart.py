"""multipart/related in and out, streamed (RFC 2387, PS3.18 8.6.1.2).

In: the request body is fed chunk by chunk to `multipart.PushMultipartParser` and each part is
written to its own temporary file as it arrives, so neither the body nor a part is ever held
in memory. Out: a plain generator of bytes that StreamingResponse drains part by part.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import multipart as mp

from broker.dicom.received import HashingWriter
from broker.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class MediaType:
    """A media type with its parameters (names lowercased, values unquoted)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def q(self) -> float:
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 0.0


def _split_outside_quotes(value: str, sep: str) -> list[str]:
    out, cur, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_media_type(value: str) -> MediaType:
    """`multipart/related; type="application/dicom"; boundary=x` -> MediaType (quotes optional)."""
    head, *rest = _split_outside_quotes(value, ";")
    params: dict[str, str] = {}
    for item in rest:
        name, eq, val = item.partition("=")
        if not eq:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        params[name.strip().lower()] = val
    return MediaType(head.strip().lower(), params)


def parse_accept(value: str | None) -> list[MediaType]:
    """An Accept header as media ranges, best first (stable for equal q); empty header = */*."""
    if not value or not value.strip():
        return [MediaType("*/*")]
    ranges = [parse_media_type(v) for v in _split_outside_quotes(value, ",") if v.strip()]
    ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def related_boundary(content_type: str | None, *, part_type: str = "application/dicom") -> str:
    """Check a STOW-RS request's Content-Type and return its boundary (see `related_request`)."""
    return related_request(content_type, part_types=(part_type,))[1]


def related_request(content_type: str | None, *, part_types: tuple[str, ...]) -> tuple[str, str]:
    """(declared `type`, boundary) of a STOW-RS request's multipart/related Content-Type.

    415 when it is not multipart/related or announces a `type` not in `part_types`; 400 when
    the boundary is missing. `type` is matched quoted or unquoted; a missing `type` is tolerated
    (each part then speaks for itself through its own Content-Type) and returned as "".
    """
    wanted = f'multipart/related; type="{part_types[0]}"'
    if not content_type:
        raise UnsupportedMediaType(f"Content-Type is required: {wanted}")
    mt = parse_media_type(content_type)
    if mt.type != "multipart/related":
        raise UnsupportedMediaType(f"unsupported Content-Type {mt.type!r}: expected {wanted}")
    declared = mt.params.get("type", "").strip().lower()
    if declared and declared not in part_types:
        accepted = " or ".join(repr(t) for t in part_types)
        raise UnsupportedMediaType(
            f"unsupported multipart/related type {declared!r}: only {accepted} parts are accepted"
        )
    boundary = mt.params.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/related Content-Type has no boundary parameter")
    if len(boundary) > 200:
        raise BadRequest("multipart boundary is longer than the 70 characters RFC 2046 allows")
    return declared, boundary


class _RelatedParser(mp.PushMultipartParser):
    """The push parser, minus its form-data rule that every part has a Content-Disposition."""

    def _create_segment(self, headerlist: list[tuple[str, str]]) -> mp.MultipartSegment:
        return mp.MultipartSegment(headerlist)


@dataclass(frozen=True, slots=True)
class Part:
    path: str  # a temporary file holding the part's body
    content_type: str  # lowercased, without parameters; "" when the part had none
    size: int
    location: str = ""  # Content-Location, how metadata's BulkDataURI names the part (PS3.18 10.5)
    header: str = ""  # the whole Content-Type header, parameters included (e.g. transfer-syntax)
    sha256: str = ""  # of the body, computed while it was written (so ingest does not read it to hash)


class ReceivedParts:
    """The parts of one request on disk; `cleanup()` (or `async with`) removes them."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.derived: list[str] = []  # files made from the parts (e.g. Part 10 from JSON + bulk data)

    def cleanup(self) -> None:
        for path in [*(part.path for part in self.parts), *self.derived]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.parts.clear()
        self.derived.clear()

    async def __aenter__(self) -> ReceivedParts:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.cleanup()


def _exclusive(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _part_file(spool: str, token: str, n: int) -> BinaryIO:
    """A new part's spool file, created exclusively (O_EXCL, owner-only) under a random
    per-request stem, as `tempfile` would, without its per-file name draws, path resolution and
    wrapper objects (a STOW-RS batch of 100 small instances opens 100 of them on the event loop)."""
    path = os.path.join(spool, f"stow-{token}-{n}.part")
    return open(path, "xb", opener=_exclusive)  # noqa: SIM115 - closed at the part's end


async def receive_parts(
    chunks: AsyncIterator[bytes],
    *,
    boundary: str,
    max_part_bytes: int,
    into: ReceivedParts,
    tmp_dir: str | None = None,
    max_total_bytes: int | None = None,
    max_parts: int | None = None,
) -> ReceivedParts:
    """Stream a multipart/related body into temporary files, one per part.

    Raises BadRequest (broken or empty multipart) or PayloadTooLarge (a part above
    `max_part_bytes`, a body above `max_total_bytes`, more than `max_parts` parts). Files
    already written are listed in `into` either way, so the caller's cleanup removes them.
    """
    parser = _RelatedParser(boundary, max_header_count=64, max_segment_size=max_part_bytes)
    spool = os.path.abspath(tmp_dir if tmp_dir is not None else tempfile.gettempdir())
    token = secrets.token_hex(8)  # one random name stem per request; parts are numbered
    current = None
    current_segment: mp.MultipartSegment | None = None
    total = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            total += len(chunk)
            if max_total_bytes is not None and total > max_total_bytes:
                raise PayloadTooLarge(f"the request body exceeds the limit of {max_total_bytes} bytes")
            for event in parser.parse(chunk):
                if isinstance(event, mp.MultipartSegment):
                    if max_parts is not None and len(into.parts) >= max_parts:
                        raise PayloadTooLarge(f"the request holds more than the limit of {max_parts} parts")
                    current_segment = event
                    current = HashingWriter(_part_file(spool, token, len(into.parts)))
                    into.parts.append(
                        Part(
                            current.name,
                            event.content_type or "",
                            0,
                            event.header("Content-Location", "") or "",
                            event.header("Content-Type", "") or "",
                        )
                    )
                elif event is None:
                    if current is not None and current_segment is not None:
                        current.close()
                        last = into.parts[-1]
                        into.parts[-1] = Part(
                            current.name,
                            last.content_type,
                            current.size,
                            last.location,
                            last.header,
                            current.received().sha256,
                        )
                    current, current_segment = None, None
                elif current is not None:
                    # Page-cache writes of parser-sized chunks; cheaper than a thread hop each.
                    current.write(event)
        for _event in parser.parse(b""):
            pass
    except mp.ParserLimitReached as exc:
        raise PayloadTooLarge(f"a multipart part exceeds the limit of {max_part_bytes} bytes") from exc
    except mp.ParserError as exc:
        raise BadRequest(f"broken multipart/related body: {exc}") from exc
    finally:
        if current is not None:
            current.close()
    if not into.parts:
        raise BadRequest("multipart/related body holds no parts")
    return into


def new_boundary() -> str:
    return f"scanonce-{secrets.token_hex(16)}"


def related_stream(
    parts: Iterable[tuple[str, Iterable[bytes]]],
    *,
    boundary: str,
    part_headers: dict[str, str] | None = None,
    flush_at: int = 1 << 20,
) -> Iterator[bytes]:
    """multipart/related body from (content-type, chunks) pairs, produced lazily.

    A sync generator on purpose: StreamingResponse drains it in a worker thread, where the
    blocking object-store reads behind each part's chunks belong. Each `next()` costs a thread
    hop, so small pieces (boundaries, headers, small instances) are gathered into writes of about
    `flush_at` bytes; memory stays bounded by that plus one store chunk.
    """
    dash = b"--" + boundary.encode("ascii")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (part_headers or {}).items()).encode("latin-1")
    pending: list[bytes] = []
    size = 0
    for content_type, chunks in parts:
        head = dash + CRLF + f"Content-Type: {content_type}\r\n".encode("latin-1") + extra + CRLF
        pending.append(head)
        size += len(head)
        for chunk in chunks:
            if not chunk:
                continue
            pending.append(chunk)
            size += len(chunk)
            if size >= flush_at:
                yield b"".join(pending)
                pending.clear()
                size = 0
        pending.append(CRLF)
        size += 2
    pending.append(dash + b"--" + CRLF)
    yield b"".join(pending)

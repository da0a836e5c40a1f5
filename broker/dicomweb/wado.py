"""WADO-RS (PS3.18 10.4): media type negotiation and the blocking work behind each retrieve.

Everything that touches pydicom or the object store is a plain blocking function here; the routes
run them in a worker thread, and bodies are sync generators that StreamingResponse drains in one.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from broker.dicom import pixels
from broker.dicomweb.multipart import MediaType, parse_accept
from broker.errors import BadRequest, NotAcceptable, NotFound
from broker.index.schemas import InstanceRef
from storage import ObjectStore

log = logging.getLogger("scanonce.wado")

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
OCTET = "application/octet-stream"
EXPLICIT_LE = str(ExplicitVRLittleEndian)

# Transfer syntaxes `pixels.to_explicit_little` turns into Explicit VR Little Endian without loss.
_LOSSLESS_TO_ELE = frozenset(str(u) for u in pixels._NATIVE | pixels._LOSSLESS_ENCAPSULATED)  # noqa: SLF001


# ------------------------------------------------------------------------------- negotiation


def _is_related(mt: MediaType) -> bool:
    return mt.type in ("multipart/related", "multipart/*", "*/*")


def _part_type(mt: MediaType, default: str) -> str:
    return mt.params.get("type", "").strip().lower() or default


@dataclass(frozen=True, slots=True)
class Delivery:
    ref: InstanceRef
    transfer_syntax: str
    transcode: bool


@dataclass(frozen=True, slots=True)
class InstancesPlan:
    """How a retrieve is answered: what is sent, in which syntax, and what cannot be."""

    deliveries: list[Delivery]
    undeliverable: list[InstanceRef]  # not sendable in the asked transfer syntax (206 + Warning)
    asked: str  # the transfer syntax asked for, for the Warning: a UID, "*" or "(default)"
    single_part: bool = False  # `application/dicom` alone: the instance is the body (Retrieve Instance)

    @property
    def partial(self) -> bool:
        return bool(self.undeliverable)


def _delivery(ref: InstanceRef, ts: str | None) -> Delivery | None:
    """How one instance is sent for the asked transfer syntax (`ts`: a UID, "*", or None for the
    default); None when it cannot be sent in it (no lossy or lossless encoder is used here)."""
    stored = ref.transfer_syntax_uid or EXPLICIT_LE
    if ts == "*" or ts == stored:
        return Delivery(ref, stored, False)
    if ts is None or ts == EXPLICIT_LE:
        if stored in _LOSSLESS_TO_ELE:
            return Delivery(ref, EXPLICIT_LE, True)
        if ts is None:
            # PS3.18 8.7.3.4: the default is Explicit VR Little Endian, except for pixel data the
            # origin server holds only in lossy form, which it returns in the syntax received.
            return Delivery(ref, stored, False)
    return None


def _plan_for(mt: MediaType, refs: list[InstanceRef], *, single_part: bool) -> InstancesPlan:
    ts = mt.params.get("transfer-syntax") or None
    out: list[Delivery] = []
    missing: list[InstanceRef] = []
    for ref in refs:
        d = _delivery(ref, ts)
        if d is None:
            missing.append(ref)
        else:
            out.append(d)
    return InstancesPlan(out, missing, ts or "(default)", single_part)


def negotiate_instances(
    accept: str | None, refs: list[InstanceRef], *, allow_single: bool = False
) -> InstancesPlan:
    """Pick, from the Accept header, how each instance is sent.

    The first media range (by q) that delivers every instance wins. When none does, the one that
    delivers most is used and the rest are reported (PS3.18: 206 Partial Content with a Warning);
    406 only when no range delivers anything. `allow_single`: the target is one instance, which
    may also be asked for as a single-part `application/dicom` body.
    """
    best: InstancesPlan | None = None
    for mt in parse_accept(accept):
        if _is_related(mt) and _part_type(mt, DICOM) in (DICOM, "*/*", "application/*"):
            plan = _plan_for(mt, refs, single_part=False)
        elif allow_single and mt.type == DICOM:
            plan = _plan_for(mt, refs, single_part=True)
        else:
            continue
        if not plan.partial:
            return plan
        if plan.deliveries and (best is None or len(plan.deliveries) > len(best.deliveries)):
            best = plan
    if best is not None:
        return best
    stored = sorted({r.transfer_syntax_uid for r in refs})
    raise NotAcceptable(
        'no acceptable representation: instances are retrieved as multipart/related; type="application/dicom"'
        f" (stored transfer syntaxes: {', '.join(stored)}; add transfer-syntax=* to take them as stored)"
    )


def partial_warning(plan: InstancesPlan, *, limit: int = 10) -> str:
    """The Warning text of a partial retrieve: which instances were left out, and why."""
    uids = [r.sop_uid for r in plan.undeliverable]
    shown = ", ".join(uids[:limit]) + (f" and {len(uids) - limit} more" if len(uids) > limit else "")
    return (
        f"{len(uids)} of {len(uids) + len(plan.deliveries)} instances cannot be returned in transfer syntax"
        f" {plan.asked} and were left out: {shown}"
    )


@dataclass(frozen=True, slots=True)
class FramesPlan:
    as_stored: bool  # encapsulated frames as they are in the file, else decoded native pixels
    part_type: str | None  # the media type every part must have; None: whatever the pixels are
    label_octet: bool  # as stored but labelled application/octet-stream (the client asked for that)


def negotiate_frames(accept: str | None, stored: str) -> FramesPlan:
    """PS3.18 8.7.3: octet-stream is native pixels unless `transfer-syntax=*` asks for the stored
    bytes (then still labelled octet-stream, with the stored transfer syntax); an image or video
    type, or any type, is the stored bitstream. `stored`: the instance's transfer syntax; a range
    it cannot meet (image/jpeg for RLE) gives way to the next one (RFC 9110 12.5.1)."""
    stored = stored or EXPLICIT_LE
    for mt in parse_accept(accept):
        if not _is_related(mt):
            continue
        part = _part_type(mt, OCTET)
        ts = mt.params.get("transfer-syntax")
        if part == OCTET:
            if ts == "*":
                return FramesPlan(True, None, True)
            if ts in (None, "", EXPLICIT_LE):
                return FramesPlan(False, OCTET, False)
            # Uncompressed bulk data has one syntax (PS3.18 8.7.3.3.1): this range cannot be met.
            continue
        if part in ("*/*", "image/*"):
            return FramesPlan(True, None, False)
        if part == _stored_frame_type(stored) and ts in (None, "", "*", stored):
            return FramesPlan(True, part, False)
    raise NotAcceptable(
        'frames are retrieved as multipart/related; type="application/octet-stream" (uncompressed, '
        f"transfer-syntax={EXPLICIT_LE}, or transfer-syntax=* as stored) or with the stored image media type"
        f" ({_stored_frame_type(stored)}, transfer syntax {stored})"
    )


def _stored_frame_type(stored: str) -> str:
    try:
        return pixels.media_type_for_transfer_syntax(stored)
    except NotAcceptable:
        return "none"


def negotiate_bulk(accept: str | None) -> bool:
    """True: a single-part `application/octet-stream` body (which Range applies to); False: the
    multipart/related form (the default, what DICOMweb clients ask for)."""
    for mt in parse_accept(accept):
        if _is_related(mt) and _part_type(mt, OCTET) in (OCTET, "*/*", "application/*"):
            return False
        if mt.type == OCTET:
            return True
    raise NotAcceptable(
        'bulk data is retrieved as multipart/related; type="application/octet-stream", '
        "or as application/octet-stream alone"
    )


def negotiate_rendered(accept: str | None, *, multipart: bool = False) -> str:
    """The image type of a rendered resource. `multipart`: a study or series, whose answer is
    multipart/related and which PS3.18 10.4.4 asks for as `multipart/related; type="image/..."`;
    a single image type is still taken for it, as dicomweb-client and others send one."""
    for mt in parse_accept(accept):
        if multipart and mt.type in ("multipart/related", "multipart/*"):
            part = _part_type(mt, "image/jpeg")
            if part in ("*/*", "image/*"):
                return "image/jpeg"
            if part in pixels.RENDERED_MEDIA_TYPES:
                return part
            continue
        if mt.type in ("*/*", "image/*"):
            return "image/jpeg"
        if mt.type in pixels.RENDERED_MEDIA_TYPES:
            return mt.type
    offered = ", ".join(sorted(pixels.RENDERED_MEDIA_TYPES))
    raise NotAcceptable(f"rendered images are available as {offered}")


def negotiate_json(accept: str | None) -> None:
    for mt in parse_accept(accept):
        if mt.type in ("application/dicom+json", "application/json", "*/*", "application/*"):
            return
    raise NotAcceptable("this resource is available as application/dicom+json only")


def negotiate_metadata(accept: str | None) -> str:
    """`application/dicom+json`, or `application/dicom+xml` (PS3.18 8.7.3.2: XML metadata is a
    multipart/related payload, one Native DICOM Model document per instance)."""
    for mt in parse_accept(accept):
        if mt.type in ("application/dicom+json", "application/json", "*/*", "application/*"):
            return DICOM_JSON
        if mt.type == "multipart/related" and _part_type(mt, "") == DICOM_XML:
            return DICOM_XML
    raise NotAcceptable(
        'metadata is available as application/dicom+json or multipart/related; type="application/dicom+xml"'
    )


def byte_range(value: str | None, size: int) -> range | None:
    """The one byte range a Range header asks of a `size`-byte body (RFC 9110 14.2), as offsets.

    None: serve the whole body (no header, another unit, a syntax error, or several ranges, which a
    server may answer in full). An empty range: the range lies wholly beyond the body (416).
    """
    if not value:
        return None
    unit, eq, spec = value.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        return range(max(0, size - suffix), size) if suffix and size else range(0)
    start = int(first)
    if last != "" and int(last) < start:
        return None  # an invalid range is ignored, not refused
    if start >= size:
        return range(0)
    return range(start, size if last == "" else min(size, int(last) + 1))


# ------------------------------------------------------------------------------- reading


def read_dataset(store: ObjectStore, ref: InstanceRef) -> Dataset:
    """The whole stored instance (pydicom needs all of it to decode pixels).

    One instance at a time is read into memory; a study never is.
    """
    local = store.open_local(ref.object_key)
    if local is not None:
        return dcmread(local)
    return dcmread(io.BytesIO(b"".join(store.get(ref.object_key))))


def _transcoded(store: ObjectStore, ref: InstanceRef) -> bytes | None:
    ds = read_dataset(store, ref)
    out = pixels.to_explicit_little(ds)
    if out is None:
        return None
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def instance_parts(store: ObjectStore, plan: list[Delivery]) -> Iterator[tuple[str, Iterable[bytes]]]:
    """(content type, chunks) for each instance of a retrieve, read lazily one at a time."""
    for d in plan:
        if d.transcode:
            try:
                data = _transcoded(store, d.ref)
            except Exception:  # noqa: BLE001 - one unreadable instance must not cut the stream
                log.warning("transcoding %s failed; sending it as stored", d.ref.sop_uid, exc_info=True)
                data = None
            if data is not None:
                yield f"{DICOM}; transfer-syntax={EXPLICIT_LE}", (data,)
                continue
            yield f"{DICOM}; transfer-syntax={d.ref.transfer_syntax_uid}", store.get(d.ref.object_key)
        else:
            yield f"{DICOM}; transfer-syntax={d.transfer_syntax}", store.get(d.ref.object_key)


def parse_frame_list(text: str) -> list[int]:
    frames = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or not item.isascii() or len(item) > 9 or int(item) < 1:
            raise BadRequest(f"frame numbers are positive integers separated by commas, got {text[:60]!r}")
        frames.append(int(item))
    if not frames:
        raise BadRequest("no frame numbers given")
    return frames


def frame_parts(
    store: ObjectStore, ref: InstanceRef, frames: list[int], plan: FramesPlan
) -> list[tuple[str, bytes]]:
    ds = read_dataset(store, ref)
    if "PixelData" not in ds:
        raise NotFound(f"instance {ref.sop_uid} has no pixel data")
    got = pixels.get_frames(ds, frames, as_stored=plan.as_stored)
    ts = pixels.frames_transfer_syntax(ds, as_stored=plan.as_stored)
    out = []
    for data, mt in got:
        if plan.label_octet:
            mt = OCTET
        if plan.part_type is not None and mt != plan.part_type:
            raise NotAcceptable(f"frames of this instance are {mt}, not {plan.part_type}")
        out.append((f"{mt}; transfer-syntax={ts}", data))
    return out


def _bulk_path(text: str) -> list[tuple[int, int]]:
    """`TTTTTTTT` or `SSSSSSSS/n/TTTTTTTT[/n/TTTTTTTT...]` (a value inside item n of a sequence,
    items numbered from 1 as in PS3.19) -> [(sequence tag, item number)..., (tag, 0)]."""
    parts = text.strip().split("/")
    if len(parts) % 2 == 0 or len(parts) > 31:
        raise BadRequest(f"bulk data path is TAG or SEQTAG/ITEM/TAG..., got {text[:60]!r}")
    steps = []
    for i in range(0, len(parts), 2):
        tag = parts[i]
        if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
            raise BadRequest(f"bulk data tag must be 8 hexadecimal digits, got {tag[:20]!r}")
        item = parts[i + 1] if i + 1 < len(parts) else "0"
        last = i + 1 >= len(parts)
        if not item.isascii() or not item.isdigit() or len(item) > 6 or (not last and int(item) < 1):
            raise BadRequest(f"bulk data item numbers are positive integers, got {item[:20]!r}")
        steps.append((int(tag, 16), int(item)))
    return steps


def bulk_value(store: ObjectStore, ref: InstanceRef, tag_text: str) -> bytes:
    steps = _bulk_path(tag_text)
    where = tag_text.strip().upper()
    ds = read_dataset(store, ref)
    for seq_tag, number in steps[:-1]:
        seq = ds.get(Tag(seq_tag))
        if seq is None or seq.VR != "SQ" or not 1 <= number <= len(seq.value):
            raise NotFound(f"instance {ref.sop_uid} has no bulk data at {where}")
        ds = seq.value[number - 1]
    tag = Tag(steps[-1][0])
    if tag not in ds:
        raise NotFound(f"instance {ref.sop_uid} has no bulk data at {where}")
    value = ds[tag].value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raw = ds.get_item(tag)
    raw_value = getattr(raw, "value", None)
    if isinstance(raw_value, bytes | bytearray):
        return bytes(raw_value)
    raise NotFound(f"attribute {where} of instance {ref.sop_uid} is not bulk data")


def thumbnail_ref(refs: list[InstanceRef]) -> InstanceRef:
    """The instance a study's or series' thumbnail shows: the middle one of those with pixels
    (a report or plan in the middle would leave a study of images without one); the middle one
    of all when the index knows of none (rows not indexed, as for some synced studies)."""
    images = [r for r in refs if r.rows] or refs
    return images[len(images) // 2]


@dataclass(frozen=True, slots=True)
class RenderParams:
    """The rendered resources' query parameters (PS3.18 8.3.5.1), checked."""

    window: pixels.Window | None = None
    viewport: tuple[int, int] | None = None  # vw, vh
    region: pixels.Region | None = None  # sx, sy, sw, sh of viewport=vw,vh,sx,sy,sw,sh
    quality: int = 90


def render_instance(
    store: ObjectStore,
    ref: InstanceRef,
    *,
    media_type: str,
    frame: int | None,
    params: RenderParams,
    thumbnail: bool = False,
) -> bytes:
    if thumbnail and params.region is not None:
        # A thumbnail is the server's pick of image (the middle one of a study or series), so
        # pixel coordinates in it mean nothing to the caller; refused, not silently ignored.
        raise BadRequest(
            "a thumbnail takes viewport=vw,vh only; a source region (sx,sy,sw,sh) is for /rendered"
        )
    ds = read_dataset(store, ref)
    if "PixelData" not in ds:
        raise NotAcceptable(f"instance {ref.sop_uid} has no pixel data to render")
    if thumbnail:
        return pixels.thumbnail(ds, media_type=media_type, viewport=params.viewport)
    return pixels.render(
        ds,
        frame=frame or 1,
        media_type=media_type,
        window=params.window,
        viewport=params.viewport,
        region=params.region,
        quality=params.quality,
    )


def rendered_parts(
    store: ObjectStore,
    refs: list[InstanceRef],
    *,
    media_type: str,
    params: RenderParams,
) -> Iterator[tuple[str, Iterable[bytes]]]:
    """Each instance of a study or series rendered (first frame); instances without pixels
    (reports, plans) are skipped, as PS3.18 renders only what has an image. An instance the
    parameters do not fit (a source region outside its image) is skipped too; when that leaves
    nothing, the parameters are refused (400) rather than answered with an empty 200."""
    rendered = 0
    refused: BadRequest | None = None
    for ref in refs:
        ds = read_dataset(store, ref)
        if "PixelData" not in ds:
            continue
        try:
            data = pixels.render(
                ds,
                media_type=media_type,
                window=params.window,
                viewport=params.viewport,
                region=params.region,
                quality=params.quality,
            )
        except BadRequest as exc:
            log.info("rendering %s refused: %s; skipped", ref.sop_uid, exc.message)
            refused = exc
            continue
        except Exception:  # noqa: BLE001 - one undecodable instance must not cut the stream
            log.warning("rendering %s failed; skipped", ref.sop_uid, exc_info=True)
            continue
        rendered += 1
        yield media_type, (data,)
    if not rendered and refused is not None:
        # Nothing has been written yet, so this still becomes the response's status.
        raise refused


_WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")  # PS3.18 8.3.5.1.3
_VIEWPORT_MAX = 8192


def _viewport_int(text: str, name: str) -> int:
    # Not int() alone: it also reads "1_000" and non-ASCII digits, which no client means here.
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text.strip()):
        raise BadRequest(f"viewport {name} must be an integer number of pixels")
    return int(text)


def _parse_viewport(value: str) -> tuple[tuple[int, int], pixels.Region | None]:
    """`vw,vh` or `vw,vh,sx,sy,sw,sh` where any of sx, sy, sw, sh may be left empty for its
    default (PS3.18 8.3.5.1.3: `viewport=256,256,,,100,100`): sx, sy 0, sw, sh to the image's edge."""
    parts = value.split(",")
    if len(parts) not in (2, 6):
        raise BadRequest(f"viewport is vw,vh or vw,vh,sx,sy,sw,sh; {len(parts)} values were given")
    if not parts[0].strip() or not parts[1].strip():
        raise BadRequest("viewport vw and vh (the output width and height) are required")
    vw, vh = _viewport_int(parts[0], "vw"), _viewport_int(parts[1], "vh")
    if not (0 < vw <= _VIEWPORT_MAX and 0 < vh <= _VIEWPORT_MAX):
        raise BadRequest(f"viewport width and height (vw, vh) must be between 1 and {_VIEWPORT_MAX}")
    if len(parts) == 2:
        return (vw, vh), None
    sx, sy, sw, sh = (
        _viewport_int(text, name) if text.strip() else None
        for text, name in zip(parts[2:], ("sx", "sy", "sw", "sh"), strict=True)
    )
    if (sx is not None and sx < 0) or (sy is not None and sy < 0):
        raise BadRequest("viewport sx and sy (the source region's top-left corner) must not be negative")
    if sw == 0 or sh == 0:
        raise BadRequest("viewport sw and sh (the source region's width and height) must not be 0")
    return (vw, vh), pixels.Region(x=sx or 0, y=sy or 0, width=sw, height=sh)


def parse_render_params(query: dict[str, str]) -> RenderParams:
    """window=center,width[,function], viewport=vw,vh[,sx,sy,sw,sh], quality=1..100 (PS3.18 8.3.5.1).

    Checked here, not only when rendering, where they can be: a study or series rendering leaves
    out an instance it cannot render, so a bad parameter would empty the answer, not refuse it.
    Whether a source region fits an image is known only once the image is read (pixels.render)."""
    window: pixels.Window | None = None
    if query.get("window"):
        parts = query["window"].split(",")
        try:
            center, width = float(parts[0]), float(parts[1])
        except (IndexError, ValueError) as exc:
            raise BadRequest("window is center,width[,function] with numbers") from exc
        if not (math.isfinite(center) and math.isfinite(width)):
            # float() reads nan, inf and 1e400 too; they would render a blank image with a 200.
            raise BadRequest("window center and width must be finite numbers")
        if width <= 0:
            raise BadRequest("window width must be positive")
        if len(parts) > 3:
            raise BadRequest("window is center,width[,function]")
        window = (center, width)
        if len(parts) == 3:
            function = parts[2].strip().lower().replace("_", "-")
            if function not in _WINDOW_FUNCTIONS:
                raise BadRequest(f"the window function must be one of {', '.join(_WINDOW_FUNCTIONS)}")
            window = (center, width, function)
    viewport, region = _parse_viewport(query["viewport"]) if query.get("viewport") else (None, None)
    quality = 90
    if query.get("quality"):
        try:
            quality = int(query["quality"])
        except ValueError as exc:
            raise BadRequest("quality is an integer from 1 to 100") from exc
        if not 1 <= quality <= 100:
            raise BadRequest("quality is an integer from 1 to 100")
    return RenderParams(window=window, viewport=viewport, region=region, quality=quality)


@dataclass(frozen=True, slots=True)
class SinglePart:
    """A body sent alone (not multipart): its type, length and a reader of byte ranges, so that a
    Range request reads only what it asks for."""

    content_type: str
    size: int
    read: Callable[[int, int], Iterable[bytes]]  # the bytes [start, end)


def single_bytes(content_type: str, data: bytes) -> SinglePart:
    return SinglePart(content_type, len(data), lambda start, end: (data[start:end],))


def single_instance(store: ObjectStore, d: Delivery) -> SinglePart:
    """Retrieve Instance as a single `application/dicom` body (PS3.18 10.4.1.1.3)."""
    if d.transcode:
        data = _transcoded(store, d.ref)
        if data is not None:
            return single_bytes(f"{DICOM}; transfer-syntax={EXPLICIT_LE}", data)
    key = d.ref.object_key
    return SinglePart(
        f"{DICOM}; transfer-syntax={d.ref.transfer_syntax_uid}",
        d.ref.size,
        lambda start, end: store.get(key, start=start, end=end),
    )

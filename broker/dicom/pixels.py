"""Pixel data know-how for WADO-RS: frames (PS3.18 8.7.3), rendered images (8.3.5), transcoding.

Every function here is pure and blocking (numpy, pydicom's decoders, Pillow): async callers run them
in a thread. Errors are broker.errors types whose messages name transfer syntaxes and frame numbers,
never patient data.

Decoding goes through pydicom's `pixels` backend, so what decodes is what the installed plugins
(pydicom's own RLE and native decoders, pylibjpeg + libjpeg/openjpeg, Pillow) can do.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from PIL import Image, features
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder, pack_bits
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from broker.errors import BadRequest, NotAcceptable, NotFound, ScanOnceError

log = logging.getLogger(__name__)

OCTET_STREAM: Final = "application/octet-stream"

# Native (uncompressed) encodings: the pixel bytes can be sliced per frame without a decoder.
_NATIVE: Final = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
)

# PS3.18 Table 8.7.3-5 (frame media types by transfer syntax) for the encapsulated syntaxes.
_FRAME_MEDIA_TYPES: Final[dict[str, str]] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "image/jpeg",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57": "image/jpeg",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "image/jls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "image/jls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "image/jp2",  # JPEG 2000
    "1.2.840.10008.1.2.4.92": "image/jpx",  # JPEG 2000 Part 2 Lossless Only
    "1.2.840.10008.1.2.4.93": "image/jpx",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.201": "image/jphc",  # HTJ2K Lossless Only
    "1.2.840.10008.1.2.4.202": "image/jphc",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "image/jphc",  # HTJ2K
    "1.2.840.10008.1.2.4.110": "image/jxl",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111": "image/jxl",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112": "image/jxl",  # JPEG XL
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # RLE Lossless
}

# Video syntaxes hold one stream for all frames: there is no per-frame "as stored" representation.
# MPEG-2, MPEG-4 and HEVC are 1.2.840.10008.1.2.4.100 to .108 (with .1 fragmentable variants).
_VIDEO_PREFIX: Final = "1.2.840.10008.1.2.4.10"

# Encapsulated syntaxes whose decoding reproduces the encoder's input exactly (PS3.5 8.2 / A.4).
# JPEG 2000 (.91), JPEG-LS near-lossless (.81) and HTJ2K (.203) may carry lossy data, so they are out.
_LOSSLESS_ENCAPSULATED: Final = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless Only
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless Only
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    }
)

_LOSSY_JPEG: Final = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})

# Rendered media types Pillow writes as 8-bit images (PS3.18 8.3.5.1.1 single-frame rendered types).
_RENDER_FORMATS: Final[dict[str, str]] = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
if features.check("jpg_2000"):
    _RENDER_FORMATS["image/jp2"] = "JPEG2000"

RENDERED_MEDIA_TYPES: Final = frozenset(_RENDER_FORMATS)

# A `window=` override: (center, width) or (center, width, function).
Window = tuple[float, float] | tuple[float, float, str]
_VOI_FUNCTIONS: Final = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


@dataclass(frozen=True, slots=True)
class Region:
    """The source region of PS3.18's `viewport=vw,vh,sx,sy,sw,sh` (8.3.5.1.3), in the image's
    pixel coordinates: (x, y) its top-left corner; a width or height of None runs to the image's
    right or bottom edge, and a negative one takes the same |width| columns (|height| rows) from
    (x, y) and flips them horizontally (vertically)."""

    x: int = 0
    y: int = 0
    width: int | None = None
    height: int | None = None


# --------------------------------------------------------------------------------------------- basics


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; Implicit VR Little Endian when the file has no meta header."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    # A dataset without meta (e.g. received over DIMSE and not yet wrapped) was read as implicit LE.
    return ImplicitVRLittleEndian


def _ts_label(uid: UID) -> str:
    name = uid.name if uid.is_transfer_syntax else ""
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def is_encapsulated(ds: Dataset) -> bool:
    return transfer_syntax(ds) not in _NATIVE


def media_type_for_transfer_syntax(uid: str) -> str:
    """PS3.18 frame media type of `uid`: application/octet-stream for native syntaxes."""
    if UID(uid) in _NATIVE:
        return OCTET_STREAM
    try:
        return _FRAME_MEDIA_TYPES[uid]
    except KeyError:
        raise NotAcceptable(f"frames in transfer syntax {_ts_label(UID(uid))} have no media type") from None


def frames_transfer_syntax(ds: Dataset, *, as_stored: bool) -> str:
    """The transfer syntax of what `get_frames(ds, ..., as_stored=as_stored)` returns.

    For the `transfer-syntax=` parameter of each multipart part's Content-Type (PS3.18 8.7.3.5.2).
    """
    ts = transfer_syntax(ds)
    if as_stored and ts not in _NATIVE:
        return str(ts)
    return str(ExplicitVRLittleEndian)


def frame_count(ds: Dataset) -> int:
    """Number of frames in the Pixel Data; 0 for an instance without pixel data."""
    if "PixelData" not in ds:
        return 0
    raw = ds.get("NumberOfFrames", 1)
    try:
        n = int(raw) if raw not in (None, "") else 1
    except (TypeError, ValueError):
        n = 1  # an unreadable Number of Frames (badVR test file) means the single frame PS3.3 implies
    return max(n, 1)


def _check_frame_numbers(ds: Dataset, frame_numbers: list[int]) -> int:
    n = frame_count(ds)
    if n == 0:
        raise NotFound("the instance has no pixel data")
    if not frame_numbers:
        raise BadRequest("no frame numbers were requested")
    for f in frame_numbers:
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise BadRequest(f"frame numbers start at 1; got {f!r}")
        if f > n:
            raise NotFound(f"frame {f} does not exist: the instance has {n} frame{'s' if n != 1 else ''}")
    return n


# --------------------------------------------------------------------------------------------- frames


def get_frames(ds: Dataset, frame_numbers: list[int], *, as_stored: bool) -> list[tuple[bytes, str]]:
    """The requested frames (1-based, in request order) as (bytes, media type) pairs.

    as_stored=True keeps an encapsulated frame as it is in the file (e.g. a JPEG bitstream, image/jpeg);
    otherwise, and always for native syntaxes, a frame is little-endian native pixel data
    (application/octet-stream) in the layout `to_explicit_little` would give: interleaved samples,
    1-bit data packed, colour as the codec yields it (YBR_RCT/ICT come out RGB, RLE YBR_FULL stays
    YBR_FULL). Lossy JPEG YBR_FULL(_422) frames are converted to RGB, as other toolkits do, since
    the upsampled result no longer matches their stored photometric interpretation anyway.
    """
    n = _check_frame_numbers(ds, frame_numbers)
    ts = transfer_syntax(ds)
    if ts in _NATIVE:
        return _native_frames(ds, frame_numbers, n)
    if as_stored:
        media_type = _stored_media_type(ts)
        return [(frame, media_type) for frame in _encapsulated_frames(ds, frame_numbers, n)]
    return [(_decode_frame_bytes(ds, f - 1), OCTET_STREAM) for f in frame_numbers]


def _stored_media_type(ts: UID) -> str:
    if str(ts).startswith(_VIDEO_PREFIX):
        raise NotAcceptable(
            f"{_ts_label(ts)} is a video stream: its frames cannot be sent one by one as stored"
        )
    try:
        return _FRAME_MEDIA_TYPES[str(ts)]
    except KeyError:
        raise NotAcceptable(f"frames in transfer syntax {_ts_label(ts)} have no known media type") from None


def _encapsulated_frames(ds: Dataset, frame_numbers: list[int], n: int) -> list[bytes]:
    eot = ds.get("ExtendedOffsetTable")
    eot_lengths = ds.get("ExtendedOffsetTableLengths")
    extended = (bytes(eot), bytes(eot_lengths)) if eot and eot_lengths else None
    wanted = set(frame_numbers)
    last = max(wanted)
    found: dict[int, bytes] = {}
    # One pass over the item headers serves any number of frames; the Basic or Extended Offset Table
    # (when present) tells where each frame starts, otherwise fragments are grouped per frame by pydicom.
    frames: Iterator[bytes] = generate_frames(ds.PixelData, number_of_frames=n, extended_offsets=extended)
    try:
        for number, frame in enumerate(frames, start=1):
            if number in wanted:
                found[number] = frame
            if number >= last:
                break
    except ValueError as exc:
        raise NotAcceptable(f"the encapsulated pixel data cannot be split into frames: {exc}") from exc
    missing = wanted - found.keys()
    if missing:
        raise NotFound(f"frame {min(missing)} is not present in the encapsulated pixel data")
    return [found[f] for f in frame_numbers]


def _little_endian_pixel_bytes(ds: Dataset) -> bytes:
    """The whole native Pixel Data as little-endian bytes (PS3.5 7.3: OW is swapped in words)."""
    data = bytes(ds.PixelData)
    if transfer_syntax(ds) != ExplicitVRBigEndian or ds["PixelData"].VR == "OB":
        return data
    bits = int(ds.get("BitsAllocated", 16))
    width = bits // 8 if bits in (32, 64) else 2
    usable = len(data) - len(data) % width
    swapped = np.frombuffer(data, dtype=f">u{width}", count=usable // width).astype(f"<u{width}").tobytes()
    return swapped + data[usable:]


def _expected_length(ds: Dataset, unit: str) -> int:
    try:
        return get_expected_length(ds, unit=unit)
    except (AttributeError, TypeError, ValueError) as exc:
        # Rows, Columns, Bits Allocated... missing or unreadable: nothing says where a frame ends.
        raise NotAcceptable(f"the stored image pixel description is incomplete or invalid: {exc}") from exc


def _native_frames(ds: Dataset, frame_numbers: list[int], n: int) -> list[tuple[bytes, str]]:
    bits = int(ds.get("BitsAllocated", 8))
    frame_bits = _expected_length(ds, "pixels") // n * int(ds.get("SamplesPerPixel", 1)) * bits
    if bits == 1 and frame_bits % 8:
        # Frames of bit-packed data do not start on byte boundaries: unpack and repack each one.
        return [(_decode_frame_bytes(ds, f - 1), OCTET_STREAM) for f in frame_numbers]
    # YBR_FULL_422 stores two samples per pixel; get_expected_length knows each such layout.
    frame_len = _expected_length(ds, "bytes") // n
    data = _little_endian_pixel_bytes(ds)
    out: list[tuple[bytes, str]] = []
    for f in frame_numbers:
        chunk = data[(f - 1) * frame_len : f * frame_len]
        if len(chunk) < frame_len:
            # The archive's copy is damaged: the server's fault, not the caller's.
            raise ScanOnceError(f"frame {f} is truncated in the stored pixel data")
        out.append((chunk, OCTET_STREAM))
    return out


def _decode(ds: Dataset, index: int, *, as_rgb: bool) -> tuple[np.ndarray, dict[str, Any]]:
    ts = transfer_syntax(ds)
    decoder = get_decoder(ts) if ts.is_transfer_syntax else None
    if decoder is None:
        raise NotAcceptable(f"pixel data in transfer syntax {_ts_label(ts)} cannot be decoded here")
    if not decoder.is_available:
        raise NotAcceptable(
            f"pixel data in transfer syntax {_ts_label(ts)} cannot be decoded: no plugin is installed"
        )
    try:
        arr, info = decoder.as_array(ds, index=index, as_rgb=as_rgb)  # type: ignore[arg-type]
    except NotImplementedError as exc:
        raise NotAcceptable(f"pixel data in transfer syntax {_ts_label(ts)} cannot be decoded here") from exc
    except Exception as exc:  # plugins raise RuntimeError/ValueError/their own types on bad codestreams
        log.info("decoding frame %d failed (%s): %s", index + 1, ts, type(exc).__name__)
        raise NotAcceptable(
            f"pixel data in transfer syntax {_ts_label(ts)} could not be decoded by the installed plugins"
        ) from exc
    return arr, dict(info)


def _decode_frame_bytes(ds: Dataset, index: int) -> bytes:
    # Only a lossy JPEG's colour conversion is allowed to round values: see get_frames.
    arr, _ = _decode(ds, index, as_rgb=transfer_syntax(ds) in _LOSSY_JPEG)
    if int(ds.get("BitsAllocated", 8)) == 1:
        return pack_bits(arr, pad=False)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes()


# --------------------------------------------------------------------------------------------- render


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, MultiValue | list | tuple) else value


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The Modality LUT / VOI LUT attributes that apply to frame `index`, as one flat dataset.

    Enhanced multi-frame objects keep them in functional groups (PS3.3 C.7.6.16): per-frame first,
    then shared, then the top level (classic objects).
    """
    view = Dataset()
    # OW-encoded LUT Data is read with the source's byte order.
    view.set_original_encoding(False, transfer_syntax(ds).is_little_endian)
    keys = (
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
    )
    for key in keys:
        if key in ds:
            setattr(view, key, ds[key].value)
    for group_key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(group_key)
        if not groups:
            continue
        if group_key.startswith("Shared"):
            item = groups[0]
        elif index < len(groups):
            item = groups[index]
        else:
            continue
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = item.get(macro)
            if seq:
                for key in keys:
                    if key in seq[0]:
                        setattr(view, key, seq[0][key].value)
    for key in ("BitsStored", "PixelRepresentation", "PhotometricInterpretation", "BitsAllocated"):
        if key in ds:
            setattr(view, key, ds[key].value)
    return view


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 VOI windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _grayscale_to_8bit(arr: np.ndarray, ds: Dataset, index: int, window: Window | None) -> np.ndarray:
    view = _frame_view(ds, index)
    values = apply_modality_lut(arr, view).astype(np.float64)
    if window is not None:
        center, width = float(window[0]), float(window[1])
        if not width > 0:
            raise BadRequest("the window width must be greater than 0")
        # PS3.18 8.3.5.1.3 spells the functions in lower case with hyphens.
        function = str(window[2] if len(window) > 2 else "linear").upper().replace("-", "_")
        if function not in _VOI_FUNCTIONS:
            raise BadRequest("the window function must be linear, linear-exact or sigmoid")
        scaled = _window(values, center, width, function)
    elif "VOILUTSequence" in view and view.VOILUTSequence:
        # The LUT's own entries span its output range: many declare 16 bits yet fill only 12.
        descriptor = view.VOILUTSequence[0].LUTDescriptor
        first, entries = int(descriptor[1]), int(descriptor[0]) or 65536
        # Clamp first: pydicom indexes 8-bit LUTs with uint8 indices, so larger inputs would wrap.
        inputs = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
        out = apply_voi(inputs, view, 0).astype(np.float64)
        lut = apply_voi(np.arange(first, first + entries), view, 0)
        lo, hi = float(lut.min()), float(lut.max())
        scaled = np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(out)
    elif view.get("WindowCenter") is not None and view.get("WindowWidth") not in (None, ""):
        center, width = float(_first(view.WindowCenter)), float(_first(view.WindowWidth))
        function = str(view.get("VOILUTFunction") or "LINEAR").upper()
        scaled = _auto_window(values) if width <= 0 else _window(values, center, width, function)
    else:
        scaled = _auto_window(values)
    out8 = np.rint(scaled * 255.0).astype(np.uint8)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        # MONOCHROME1 (and an INVERSE presentation LUT) means low values are displayed white.
        out8 = 255 - out8
    return out8


def _auto_window(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def _color_to_8bit(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        bits = int(descriptor[2]) if len(descriptor) > 2 else 16
        rgb = rgb[..., :3]  # drop alpha, which JPEG cannot carry
        return (rgb >> (bits - 8)).astype(np.uint8) if bits > 8 else rgb.astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise NotAcceptable(
            f"colour pixel data with photometric interpretation {photometric} cannot be rendered"
        )
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if bits == 8 and arr.dtype == np.uint8:
        return arr
    top = float(2**bits - 1)
    return np.rint(np.clip(arr.astype(np.float64), 0, top) * (255.0 / top)).astype(np.uint8)


def _display_size(ds: Dataset, rows: int, cols: int) -> tuple[float, float]:
    """Width and height in display units: non-square pixels (PS3.3 C.7.6.3.1.7 / 10.7.1.3) stretched."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    aspect = ds.get("PixelAspectRatio")
    try:
        if aspect and len(aspect) == 2 and float(aspect[0]) > 0 and float(aspect[1]) > 0:
            return cols * 1.0, rows * float(aspect[0]) / float(aspect[1])
        if spacing and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
            return cols * 1.0, rows * float(spacing[0]) / float(spacing[1])
    except (TypeError, ValueError):
        pass
    return float(cols), float(rows)


def _crop(image: Image.Image, region: Region) -> Image.Image:
    """`image` cut to `region` and flipped as its negative sizes ask; 400 for a region that is not
    wholly inside the image (clipping it would answer a picture of something not asked for)."""
    cols, rows = image.size
    if region.width == 0 or region.height == 0:
        raise BadRequest("the viewport's source region width and height (sw, sh) must not be 0")
    if region.x < 0 or region.y < 0:
        raise BadRequest("the viewport's source region corner (sx, sy) must not be negative")
    if region.x >= cols or region.y >= rows:
        raise BadRequest(
            f"the viewport's source region corner (sx, sy) = ({region.x}, {region.y}) is outside"
            f" the {cols} x {rows} image"
        )
    width = cols - region.x if region.width is None else abs(region.width)
    height = rows - region.y if region.height is None else abs(region.height)
    if region.x + width > cols:
        raise BadRequest(
            f"the viewport's source region, columns {region.x} to {region.x + width - 1} (sx, sw),"
            f" reaches past the image's {cols} columns"
        )
    if region.y + height > rows:
        raise BadRequest(
            f"the viewport's source region, rows {region.y} to {region.y + height - 1} (sy, sh),"
            f" reaches past the image's {rows} rows"
        )
    image = image.crop((region.x, region.y, region.x + width, region.y + height))
    if region.width is not None and region.width < 0:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if region.height is not None and region.height < 0:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _fit(width: float, height: float, box: tuple[int, int]) -> tuple[int, int]:
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _normalize_media_type(media_type: str) -> str:
    mt = media_type.split(";", 1)[0].strip().lower()
    if mt not in _RENDER_FORMATS:
        offered = ", ".join(sorted(_RENDER_FORMATS))
        raise NotAcceptable(f"rendered media type {media_type!r} is not supported; use one of {offered}")
    return mt


def render(
    ds: Dataset,
    *,
    frame: int = 1,
    media_type: str = "image/jpeg",
    window: Window | None = None,
    viewport: tuple[int, int] | None = None,
    region: Region | None = None,
    quality: int = 90,
) -> bytes:
    """One frame as a displayable 8-bit image (PS3.18 8.3.5 rendered resources).

    Grayscale goes through the Modality LUT, the VOI LUT or window (the `window` override as
    (center, width) or (center, width, "linear" | "linear-exact" | "sigmoid") from PS3.18's
    `window=` parameter wins over the dataset's), and MONOCHROME1 inversion; colour becomes RGB.
    `region` (PS3.18's `viewport=vw,vh,sx,sy,sw,sh`) then cuts out and flips part of the image;
    `viewport` is (width, height), PS3.18's `viewport=vw,vh`: the image (or region) is scaled to
    fit inside it with its aspect ratio kept.
    """
    mt = _normalize_media_type(media_type)
    _check_frame_numbers(ds, [frame])
    if viewport is not None and (viewport[0] < 1 or viewport[1] < 1):
        raise BadRequest("viewport width and height must be positive")
    if not 1 <= quality <= 100:
        raise BadRequest("quality must be between 1 and 100")
    index = frame - 1
    arr, info = _decode(ds, index, as_rgb=True)
    photometric = str(
        info.get("photometric_interpretation") or ds.get("PhotometricInterpretation", "")
    ).upper()
    samples = int(info.get("samples_per_pixel") or ds.get("SamplesPerPixel", 1))
    if samples == 1 and photometric != "PALETTE COLOR":
        pixels = _grayscale_to_8bit(arr, ds, index, window)
        image = Image.fromarray(pixels, mode="L")
    else:
        image = Image.fromarray(np.ascontiguousarray(_color_to_8bit(arr, ds, photometric)), mode="RGB")
    rows, cols = int(arr.shape[0]), int(arr.shape[1])
    width, height = _display_size(ds, rows, cols)
    if region is not None:
        # After the window, so that a region is shown as it looks in the whole image (PS3.18
        # 8.3.5.1: the source region applies after the presentation parameters), not re-windowed
        # on its own values.
        image = _crop(image, region)
        width, height = image.width * width / cols, image.height * height / rows
    target = _fit(width, height, viewport) if viewport else (round(width), round(height))
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    fmt = _RENDER_FORMATS[mt]
    if fmt == "JPEG":
        image.save(buffer, format=fmt, quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def thumbnail(
    ds: Dataset, *, media_type: str = "image/jpeg", size: int = 128, viewport: tuple[int, int] | None = None
) -> bytes:
    """A small rendering of the middle frame (the most representative of a cine loop or a volume),
    fit inside `viewport` (width, height: PS3.18's `viewport=vw,vh`) or else a `size` square, its
    aspect ratio kept."""
    box = viewport or (size, size)
    if box[0] < 1 or box[1] < 1:
        raise BadRequest("thumbnail size must be positive")
    n = frame_count(ds)
    return render(ds, frame=max(1, (n + 1) // 2), media_type=media_type, viewport=box, quality=75)


# ----------------------------------------------------------------------------------------- transcode


def _swap_other_words(ds: Dataset) -> None:
    """Byte-swap the OW/OL/OF/OD/OV values that pydicom keeps as raw bytes (all but Pixel Data)."""
    widths = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
    for elem in ds.iterall():
        width = widths.get(str(elem.VR))
        if width is None or elem.tag == 0x7FE00010 or not isinstance(elem.value, bytes | bytearray):
            continue
        data = bytes(elem.value)
        usable = len(data) - len(data) % width
        elem.value = (
            np.frombuffer(data, dtype=f">u{width}", count=usable // width).astype(f"<u{width}").tobytes()
            + data[usable:]
        )


def to_explicit_little(ds: Dataset) -> Dataset | None:
    """A copy of `ds` in Explicit VR Little Endian, or None when that would lose information.

    Native syntaxes (implicit, big endian, deflated) and lossless compressed ones that the installed
    plugins decode are transcoded; the SOP Instance UID is kept, as lossless transcoding allows
    (PS3.4 / PS3.5). Lossy syntaxes (JPEG baseline, JPEG 2000 that may be irreversible, JPEG-LS
    near-lossless...) and data no plugin can decode give None.
    """
    ts = transfer_syntax(ds)
    if ts == ExplicitVRLittleEndian:
        return copy.deepcopy(ds)
    if ts in _NATIVE:
        out = copy.deepcopy(ds)
        # Decode every raw element under the original encoding before declaring the new one.
        for _ in out.iterall():
            pass
        if ts == ExplicitVRBigEndian:
            if "PixelData" in out:
                out.PixelData = _little_endian_pixel_bytes(ds)
            _swap_other_words(out)
        _set_explicit_little(out)
        return out
    if ts not in _LOSSLESS_ENCAPSULATED:
        return None
    if "PixelData" not in ds:
        out = copy.deepcopy(ds)
        _set_explicit_little(out)
        return out
    out = copy.deepcopy(ds)
    try:
        # No colour conversion: YBR_FULL -> RGB rounds values, so it would not be lossless.
        out.decompress(as_rgb=False, generate_instance_uid=False)
    except Exception as exc:  # a missing plugin or a codestream the plugins reject
        log.info("lossless transcode of %s failed: %s", ts, type(exc).__name__)
        return None
    for key in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if key in out:
            del out[key]
    _set_explicit_little(out)
    return out


def _set_explicit_little(out: Dataset) -> None:
    if not hasattr(out, "file_meta") or out.file_meta is None:
        out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.set_original_encoding(False, True)

"""WADO-RS pixel know-how on pydicom's bundled real files: frames, rendering, lossless transcoding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from broker.dicom import pixels
from broker.errors import BadRequest, NotAcceptable, NotFound
from tests.support import QUADRANTS, quadrant_ds, quadrant_pixels, to_bytes

FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def load(name: str) -> Dataset:
    return pydicom.dcmread(FILES / name)


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def as_array(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


# ------------------------------------------------------------------------------------------- frames


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("CT_small.dcm", 1),
        ("examples_ybr_color.dcm", 30),
        ("rtdose.dcm", 15),
        ("SC_rgb_rle_2frame.dcm", 2),
        ("rtdose_rle.dcm", 15),
    ],
)
def test_frame_count(name: str, count: int) -> None:
    assert pixels.frame_count(load(name)) == count


def test_frame_count_of_an_instance_without_pixels_is_zero() -> None:
    ds = load("rtplan.dcm")
    assert pixels.frame_count(ds) == 0
    with pytest.raises(NotFound, match="no pixel data"):
        pixels.get_frames(ds, [1], as_stored=True)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "SC_rgb_small_odd.dcm",
        "rtdose.dcm",
    ],
)
def test_native_frame_is_little_endian_pixels_of_the_right_length(name: str) -> None:
    ds = load(name)
    [(data, media_type)] = pixels.get_frames(ds, [1], as_stored=True)
    assert media_type == "application/octet-stream"
    assert len(data) == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    first = ds.pixel_array if pixels.frame_count(ds) == 1 else ds.pixel_array[0]
    assert data == first.astype(first.dtype.newbyteorder("<")).tobytes()


def test_big_endian_frame_equals_little_endian_original() -> None:
    [(big, _)] = pixels.get_frames(load("MR_small_bigendian.dcm"), [1], as_stored=True)
    [(little, _)] = pixels.get_frames(load("MR_small.dcm"), [1], as_stored=True)
    assert big == little


def test_multiframe_frames_differ_and_come_in_request_order() -> None:
    ds = load("rtdose.dcm")
    frames = pixels.get_frames(ds, [3, 1, 15], as_stored=False)
    assert [len(f) for f, _ in frames] == [10 * 10 * 4] * 3
    assert len({f for f, _ in frames}) == 3
    assert frames[1][0] == ds.pixel_array[0].tobytes()
    assert frames[0][0] == ds.pixel_array[2].tobytes()


def test_as_stored_jpeg_frames_are_jpeg_bitstreams() -> None:
    ds = load("examples_ybr_color.dcm")
    frames = pixels.get_frames(ds, [1, 30], as_stored=True)
    for data, media_type in frames:
        assert media_type == "image/jpeg"
        assert data[:2] == b"\xff\xd8"
        assert decode_image(data).size == (ds.Columns, ds.Rows)
    assert frames[0][0] != frames[1][0]
    assert pixels.frames_transfer_syntax(ds, as_stored=True) == "1.2.840.10008.1.2.4.50"


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "image/jls"),
        ("MR_small_jp2klossless.dcm", "image/jp2"),
        ("JPEG2000.dcm", "image/jp2"),
        ("MR_small_RLE.dcm", "image/dicom-rle"),
        ("SC_rgb_jpeg_gdcm.dcm", "image/jpeg"),
    ],
)
def test_as_stored_media_type_follows_transfer_syntax(name: str, media_type: str) -> None:
    [(data, got)] = pixels.get_frames(load(name), [1], as_stored=True)
    assert got == media_type
    assert data


def test_decoded_frames_of_compressed_data_are_native_pixels() -> None:
    ds = load("examples_ybr_color.dcm")
    [(data, media_type)] = pixels.get_frames(ds, [2], as_stored=False)
    assert media_type == "application/octet-stream"
    assert len(data) == ds.Rows * ds.Columns * 3
    decoded = np.frombuffer(data, dtype=np.uint8).reshape(ds.Rows, ds.Columns, 3)
    # JPEG decoders may differ by a unit or two; the picture must be the same one.
    assert np.abs(decoded.astype(int) - ds.pixel_array[1].astype(int)).mean() < 1.0
    assert pixels.frames_transfer_syntax(ds, as_stored=False) == ExplicitVRLittleEndian


def test_decoded_lossless_frame_equals_uncompressed_original() -> None:
    [(rle, _)] = pixels.get_frames(load("MR_small_RLE.dcm"), [1], as_stored=False)
    [(jls, _)] = pixels.get_frames(load("MR_small_jpeg_ls_lossless.dcm"), [1], as_stored=False)
    [(plain, _)] = pixels.get_frames(load("MR_small.dcm"), [1], as_stored=False)
    assert rle == plain == jls


@pytest.mark.parametrize("offsets", ["basic", "extended", "none"])
def test_encapsulated_frames_found_with_each_offset_table(offsets: str) -> None:
    ds = load("examples_ybr_color.dcm")
    originals = [f for f, _ in pixels.get_frames(ds, list(range(1, 31)), as_stored=True)]
    if offsets == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(originals)
    else:
        ds.PixelData = encapsulate(originals, has_bot=offsets == "basic")
    got = pixels.get_frames(ds, [30, 7], as_stored=True)
    assert [f for f, _ in got] == [originals[29], originals[6]]


@pytest.mark.parametrize(("frame", "error"), [(0, BadRequest), (-1, BadRequest), (31, NotFound)])
def test_out_of_range_frames_are_refused_with_a_readable_message(frame: int, error: type) -> None:
    with pytest.raises(error, match=str(frame)) as info:
        pixels.get_frames(load("examples_ybr_color.dcm"), [1, frame], as_stored=True)
    if error is NotFound:
        assert "30 frames" in str(info.value)


def test_undecodable_frame_names_its_transfer_syntax() -> None:
    # pydicom's JPEG-lossy.dcm is a 12-bit JPEG that neither libjpeg nor Pillow decodes.
    ds = load("JPEG-lossy.dcm")
    [(data, _)] = pixels.get_frames(ds, [1], as_stored=True)
    assert data[:2] == b"\xff\xd8"
    with pytest.raises(NotAcceptable, match=r"1\.2\.840\.10008\.1\.2\.4\.51"):
        pixels.get_frames(ds, [1], as_stored=False)
    with pytest.raises(NotAcceptable, match="JPEG Extended"):
        pixels.render(ds)


# ------------------------------------------------------------------------------------------- render


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "JPGExtended.dcm",
        "image_dfl.dcm",
        "liver_1frame.dcm",
    ],
)
@pytest.mark.parametrize("media_type", ["image/jpeg", "image/png"])
def test_grayscale_render_decodes_to_full_size_non_uniform_image(name: str, media_type: str) -> None:
    ds = load(name)
    image = decode_image(pixels.render(ds, media_type=media_type))
    assert image.format == ("JPEG" if media_type == "image/jpeg" else "PNG")
    assert image.mode == "L"
    assert image.size == (ds.Columns, ds.Rows)
    arr = np.asarray(image)
    assert arr.std() > 5


def test_render_uses_dataset_window_and_override_changes_pixels() -> None:
    ds = load("MR_small.dcm")  # carries Window Center 600 / Width 1600
    default = as_array(pixels.render(ds, media_type="image/png"))
    narrow = as_array(pixels.render(ds, media_type="image/png", window=(600, 100)))
    assert not np.array_equal(default, narrow)
    # A narrow window saturates most pixels to black or white.
    assert np.isin(narrow, [0, 255]).mean() > np.isin(default, [0, 255]).mean() + 0.3
    del ds.WindowCenter, ds.WindowWidth
    auto = as_array(pixels.render(ds, media_type="image/png"))
    assert auto.min() == 0 and auto.max() == 255  # no window: the full range of the frame


def test_window_follows_the_modality_lut() -> None:
    ds = load("CT_small.dcm")  # Rescale Intercept -1024: stored 1024 is water (0 HU)
    stored = ds.pixel_array
    image = as_array(pixels.render(ds, media_type="image/png", window=(0, 2)))
    assert (image[stored >= 1025] == 255).all()
    assert (image[stored <= 1023] == 0).all()


def test_window_function_from_the_query_parameter() -> None:
    ds = load("CT_small.dcm")
    linear = as_array(pixels.render(ds, media_type="image/png", window=(0, 400, "linear")))
    sigmoid = as_array(pixels.render(ds, media_type="image/png", window=(0, 400, "sigmoid")))
    assert np.array_equal(linear, as_array(pixels.render(ds, media_type="image/png", window=(0, 400))))
    assert not np.array_equal(linear, sigmoid)
    with pytest.raises(BadRequest, match="linear-exact"):
        pixels.render(ds, window=(0, 400, "cubic"))
    with pytest.raises(BadRequest, match="width"):
        pixels.render(ds, window=(0, 0))


def test_enhanced_functional_groups_override_top_level_window_and_rescale() -> None:
    reference = load("CT_small.dcm")
    reference.WindowCenter, reference.WindowWidth = 0, 2  # in HU, Rescale Intercept -1024
    expected = as_array(pixels.render(reference, media_type="image/png"))

    ds = load("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 5000, 10  # would be all black if used
    rescale, voi = Dataset(), Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = 0, 1, "US"
    voi.WindowCenter, voi.WindowWidth = 1024, 2  # the same threshold in stored values
    shared, frame = Dataset(), Dataset()
    shared.PixelValueTransformationSequence = [rescale]
    frame.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [frame]
    assert np.array_equal(as_array(pixels.render(ds, media_type="image/png")), expected)


def test_non_square_pixels_are_stretched_to_their_true_shape() -> None:
    ds = load("CT_small.dcm")  # 128 x 128
    ds.PixelSpacing = [1.0, 0.5]  # rows 1 mm apart, columns 0.5 mm apart: pixels twice as tall as wide
    assert decode_image(pixels.render(ds)).size == (128, 256)


def test_voi_lut_sequence_is_applied() -> None:
    ds = load("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    # Inverting LUT over 0..255, everything above 255 maps to the last entry (0): a visible change.
    lut.LUTData = list(range(255, -1, -1))
    ds.VOILUTSequence = [lut]
    image = as_array(pixels.render(ds, media_type="image/png"))
    stored = ds.pixel_array
    assert (image[stored >= 255] == 0).all()
    assert (image[stored == 127] == 128).all()


def test_monochrome1_is_inverted() -> None:
    ds = load("CT_small.dcm")
    mono2 = as_array(pixels.render(ds, media_type="image/png"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = as_array(pixels.render(ds, media_type="image/png"))
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_rle.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",  # YBR_FULL JPEG
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # YBR_FULL_422 JPEG
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_rle_16bit.dcm",
        "ExplVR_BigEnd.dcm",  # planar configuration 1, big endian
        "examples_jpeg2k.dcm",  # YBR_RCT
        "examples_palette.dcm",
    ],
)
def test_colour_renders_in_colour(name: str) -> None:
    ds = load(name)
    image = decode_image(pixels.render(ds, media_type="image/png"))
    assert image.mode == "RGB"
    assert image.size == (ds.Columns, ds.Rows)
    arr = np.asarray(image).astype(int)
    # Colourful pixels (channels far apart) exist; a grey rendering would have none.
    assert ((arr.max(axis=-1) - arr.min(axis=-1)) > 40).mean() > 0.03


def test_rgb_test_pattern_colours_are_right_after_ybr_conversion() -> None:
    # The SC_rgb files are bands of red, green, blue, ... from top to bottom.
    for name in ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        arr = as_array(pixels.render(load(name), media_type="image/png")).astype(int)
        red, green, blue = arr[5, 50], arr[25, 50], arr[45, 50]
        assert red[0] > 200 and red[1] < 50 and red[2] < 50, name
        assert green[1] > 200 and green[0] < 50 and green[2] < 50, name
        assert blue[2] > 200 and blue[0] < 50 and blue[1] < 50, name


def test_multiframe_render_picks_the_frame() -> None:
    ds = load("examples_ybr_color.dcm")
    first = as_array(pixels.render(ds, frame=1, media_type="image/png"))
    last = as_array(pixels.render(ds, frame=30, media_type="image/png"))
    assert first.shape == last.shape == (ds.Rows, ds.Columns, 3)
    assert np.abs(first.astype(int) - last.astype(int)).mean() > 1
    with pytest.raises(NotFound):
        pixels.render(ds, frame=31)


def test_viewport_scales_preserving_aspect() -> None:
    ds = load("JPEG2000.dcm")  # 256 columns x 1024 rows
    image = decode_image(pixels.render(ds, viewport=(100, 100)))
    assert image.size == (25, 100)
    image = decode_image(pixels.render(load("CT_small.dcm"), viewport=(512, 300)))
    assert image.size == (300, 300)


def _quadrants() -> Dataset:
    return quadrant_ds(
        sop="1.2.826.0.1.3680043.8.498.1",
        study="1.2.826.0.1.3680043.8.498.2",
        series="1.2.826.0.1.3680043.8.498.3",
    )


def _region(ds: Dataset, viewport: tuple[int, int], region: pixels.Region) -> np.ndarray:
    return as_array(pixels.render(ds, media_type="image/png", viewport=viewport, region=region))


def test_viewport_source_region_renders_exactly_that_part_of_the_image() -> None:
    # PS3.18 8.3.5.1.3 viewport=vw,vh,sx,sy,sw,sh: the 60 x 40 image's quadrants are 30 x 20.
    ds, whole = _quadrants(), quadrant_pixels()
    top_left, _, _, bottom_right = QUADRANTS
    assert np.array_equal(_region(ds, (30, 20), pixels.Region(30, 0, 30, 20)), whole[:20, 30:])
    assert np.array_equal(_region(ds, (30, 20), pixels.Region(0, 20, 30, 20)), whole[20:, :30])
    assert np.array_equal(_region(ds, (30, 20), pixels.Region(30, 20, 30, 20)), whole[20:, 30:])
    # Straddling the middle: exactly the pixels asked for, the quadrants' edges where they were.
    assert np.array_equal(_region(ds, (20, 10), pixels.Region(20, 15, 20, 10)), whole[15:25, 20:40])
    # Scaled up into a bigger viewport, a region of one quadrant is that quadrant's value only.
    zoomed = _region(ds, (90, 90), pixels.Region(0, 0, 30, 20))
    assert zoomed.shape == (60, 90) and set(np.unique(zoomed)) == {top_left}
    # Omitted sizes run to the image's edge: from (30, 20), the bottom-right quadrant.
    rest = _region(ds, (30, 20), pixels.Region(30, 20))
    assert rest.shape == (20, 30) and set(np.unique(rest)) == {bottom_right}
    # The whole image as a region is the image.
    assert np.array_equal(_region(ds, (60, 40), pixels.Region(0, 0, 60, 40)), whole)


def test_viewport_negative_source_sizes_flip_the_region() -> None:
    ds, whole = _quadrants(), quadrant_pixels()
    # sw < 0: the same columns, mirrored left to right (top half: top-right quadrant now on the left).
    flipped = _region(ds, (60, 20), pixels.Region(0, 0, -60, 20))
    assert np.array_equal(flipped, whole[:20, ::-1])
    assert flipped[0, 0] == QUADRANTS[1] and flipped[0, -1] == QUADRANTS[0]
    # sh < 0: upside down (left half: bottom-left quadrant now on top).
    assert np.array_equal(_region(ds, (30, 40), pixels.Region(0, 0, 30, -40)), whole[::-1, :30])
    # Both, of the whole image: turned half a turn.
    assert np.array_equal(_region(ds, (60, 40), pixels.Region(0, 0, -60, -40)), whole[::-1, ::-1])


def test_viewport_source_region_fits_the_viewport_with_its_aspect_kept() -> None:
    ds = _quadrants()

    def size(viewport: tuple[int, int], region: pixels.Region) -> tuple[int, int]:
        return decode_image(pixels.render(ds, viewport=viewport, region=region)).size

    # A 30 x 20 region (3:2) in a square viewport: as wide as it, two thirds as high.
    assert size((100, 100), pixels.Region(0, 0, 30, 20)) == (100, 67)
    # A 10 x 40 region (1:4) in a wide viewport: as high as it.
    assert size((200, 80), pixels.Region(25, 0, 10, 40)) == (20, 80)
    # Non-square pixels (rows 2 mm apart, columns 1 mm): the region is shown as it is displayed.
    ds.PixelSpacing = [2, 1]
    assert size((60, 60), pixels.Region(0, 0, 30, 20)) == (45, 60)


@pytest.mark.parametrize(
    ("region", "problem"),
    [
        (pixels.Region(60, 0, 10, 10), r"corner \(sx, sy\) = \(60, 0\) is outside the 60 x 40 image"),
        (pixels.Region(0, 40), r"corner \(sx, sy\) = \(0, 40\) is outside"),
        (pixels.Region(50, 0, 20, 10), r"columns 50 to 69 \(sx, sw\), reaches past the image's 60 columns"),
        (pixels.Region(50, 0, -20, 10), r"columns 50 to 69 \(sx, sw\)"),
        (pixels.Region(0, 30, 10, 11), r"rows 30 to 40 \(sy, sh\), reaches past the image's 40 rows"),
        (pixels.Region(0, 0, 0, 10), r"\(sw, sh\) must not be 0"),
        (pixels.Region(-1, 0, 10, 10), r"\(sx, sy\) must not be negative"),
    ],
)
def test_viewport_source_region_outside_the_image_is_a_bad_request(
    region: pixels.Region, problem: str
) -> None:
    with pytest.raises(BadRequest, match=problem):
        pixels.render(_quadrants(), viewport=(64, 64), region=region)


def test_jpeg_quality_changes_size() -> None:
    ds = load("examples_jpeg2k.dcm")
    assert len(pixels.render(ds, quality=20)) < len(pixels.render(ds, quality=95))


def test_thumbnail_is_small_and_real() -> None:
    ds = load("examples_ybr_color.dcm")
    image = decode_image(pixels.thumbnail(ds, size=64))
    assert max(image.size) == 64 and image.format == "JPEG"
    png = decode_image(pixels.thumbnail(load("CT_small.dcm"), media_type="image/png"))
    assert png.size == (128, 128) and png.format == "PNG"
    assert np.asarray(png).std() > 5


def test_unsupported_media_type_is_not_acceptable() -> None:
    with pytest.raises(NotAcceptable, match="image/tiff"):
        pixels.render(load("CT_small.dcm"), media_type="image/tiff")


def test_media_type_parameters_are_ignored() -> None:
    image = decode_image(pixels.render(load("CT_small.dcm"), media_type="Image/PNG; charset=x"))
    assert image.format == "PNG"


# ---------------------------------------------------------------------------------------- transcode


def roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_lossless_transcode_preserves_pixels_exactly(name: str) -> None:
    original = load(name)
    out = pixels.to_explicit_little(original)
    assert out is not None
    written = roundtrip(out)
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert written.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(written.pixel_array, load("MR_small.dcm").pixel_array)
    assert written.PatientName == original.PatientName and written.Rows == 64
    # The caller's dataset is untouched.
    assert original.file_meta.TransferSyntaxUID == load(name).file_meta.TransferSyntaxUID


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_gdcm.dcm",
        "SC_rgb_rle_2frame.dcm",
        "rtdose_expb.dcm",
        "image_dfl.dcm",
        "examples_jpeg2k.dcm",
    ],
)
def test_lossless_transcode_of_other_syntaxes(name: str) -> None:
    original = load(name)
    out = pixels.to_explicit_little(original)
    assert out is not None
    written = roundtrip(out)
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(written.pixel_array, original.pixel_array)
    assert pixels.frame_count(written) == pixels.frame_count(original)
    assert "ExtendedOffsetTable" not in written


def test_lossless_transcode_and_decoded_frames_keep_ybr_values() -> None:
    # YBR_FULL -> RGB conversion rounds, so a lossless path must hand back the YBR samples as they are.
    ds = load("SC_ybr_full_422_uncompressed.dcm")
    ybr, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, as_rgb=False)  # type: ignore[arg-type]
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.compress(RLELossless, ybr, generate_instance_uid=False)
    out = pixels.to_explicit_little(ds)
    assert out is not None
    written = roundtrip(out)
    assert written.PhotometricInterpretation == "YBR_FULL"
    assert written.PixelData[: ybr.size] == ybr.tobytes()
    [(frame, _)] = pixels.get_frames(ds, [1], as_stored=False)
    assert frame == ybr.tobytes()


def test_big_endian_transcode_matches_little_endian_file_element_by_element() -> None:
    out = pixels.to_explicit_little(load("rtdose_expb.dcm"))
    assert out is not None
    written, reference = roundtrip(out), load("rtdose.dcm")
    for keyword in ("GridFrameOffsetVector", "DoseGridScaling", "Rows", "BitsAllocated", "NumberOfFrames"):
        assert written[keyword].value == reference[keyword].value, keyword
    assert written.PixelData == reference.PixelData


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",
        "examples_ybr_color.dcm",
        "JPGExtended.dcm",
        "JPEG2000.dcm",
        "JPEGLSNearLossless_08.dcm",
        "JPEG-lossy.dcm",
    ],
)
def test_lossy_transcode_returns_none(name: str) -> None:
    assert pixels.to_explicit_little(load(name)) is None


def test_explicit_little_copy_is_independent() -> None:
    original = load("CT_small.dcm")
    out = pixels.to_explicit_little(original)
    assert out is not None and out is not original
    out.PatientName = "Changed"
    assert original.PatientName != "Changed"

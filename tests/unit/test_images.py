"""Decoding and letterboxing on their own: images far larger than the network are reduced
before any float tensor exists, only the allowed formats are opened, and 16-bit and float
images are scaled to 8 bits rather than clipped. Pure: Pillow, NumPy and torch on the CPU."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import BadInputError
from pipeline.images import ALLOWED_FORMATS, Preprocess, as_picture, decode_image, probe


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 of slow gradients: resampling it any sensible way agrees."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = (x / width, y / height, 0.5 + 0.5 * np.sin(2 * np.pi * (x + y) / (width + height)))
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------ reduced decoding


def test_a_png_far_larger_than_the_network_is_reduced_before_the_float_tensor():
    big = smooth_rgb(4096, 3072)
    data = encoded(Image.fromarray(big), "PNG", compress_level=1)

    picture = as_picture(data, long_side=640)
    assert picture.size == (4096, 3072)  # geometry stays the full image's
    # reduced by the largest integer factor that keeps it >= 640 x 480: 6 -> 683 x 512
    assert picture.rgb.shape == (683, 512, 3)
    assert max(picture.rgb.shape[:2]) < 2 * 640

    reduced, geo = Preprocess(640, 32).tensor(picture)
    full, full_geo = Preprocess(640, 32).tensor(big)
    assert geo == full_geo and reduced.shape == full.shape == (3, 640, 480)
    assert float((reduced - full).abs().mean()) < 2 / 255


def test_reduction_never_goes_below_the_size_the_letterbox_needs():
    # 1301 x 997 at long side 640 needs 640 x 491: factor 2 gives 651 x 499, never 3 (434 x 333)
    data = encoded(Image.fromarray(smooth_rgb(997, 1301)), "PNG")
    assert as_picture(data, long_side=640).rgb.shape == (499, 651, 3)
    # a tall image, EXIF-rotated: the needed size is the shown one's
    tall = Image.fromarray(smooth_rgb(1000, 3000))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 1000 wide, 3000 tall
    picture = as_picture(encoded(tall, "PNG", exif=exif), long_side=640)
    assert picture.size == (3000, 1000) and picture.rgb.shape == (750, 250, 3)
    # and unreduced, the pixels are the stored ones turned as the orientation says
    small = smooth_rgb(30, 40)
    turned = decode_image(encoded(Image.fromarray(small), "PNG", exif=exif), long_side=640)
    assert turned.size == (40, 30) and np.array_equal(turned.rgb, np.rot90(small, k=-1))


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("PNG", "RGBA"),
                                       ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"),
                                       ("GIF", "P"), ("JPEG", "RGB")])
def test_images_under_twice_the_network_size_decode_exactly_as_at_full_size(fmt, mode):
    image = Image.fromarray(smooth_rgb(700, 1100)).convert(mode)
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(image, fmt, **options)
    reduced, full = as_picture(data, long_side=640), as_picture(data)
    assert np.array_equal(reduced.rgb, full.rgb) and reduced.size == full.size == (700, 1100)


def test_palette_and_alpha_images_are_reduced_as_their_rgb_colours():
    rgb = smooth_rgb(2000, 2000)
    rgba = np.dstack([rgb, np.zeros((2000, 2000, 1), np.uint8)])  # fully transparent
    expected = as_picture(encoded(Image.fromarray(rgb), "PNG"), long_side=500).rgb
    got = as_picture(encoded(Image.fromarray(rgba), "PNG"), long_side=500).rgb
    # alpha is dropped, as convert("RGB") always did, not premultiplied into black
    assert got.shape == expected.shape == (500, 500, 3) and np.array_equal(got, expected)


# ------------------------------------------------------------------ the allowed formats


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "ICO", "TGA"])
def test_formats_outside_the_allow_list_are_refused_by_decode_and_probe(fmt):
    data = encoded(Image.new("RGB", (16, 16), (10, 20, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    for read in (decode_image, probe):
        with pytest.raises(BadInputError) as info:
            read(data)
        assert "not a decodable image" in str(info.value)
        assert "JPEG, PNG, WebP, BMP, TIFF or GIF" in str(info.value)


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt):
    data = encoded(Image.new("RGB", (16, 12), (200, 100, 50)), fmt)
    assert probe(data)[1] == (12, 16)
    rgb = decode_image(data).rgb
    assert rgb.shape == (12, 16, 3) and np.abs(rgb.astype(int) - (200, 100, 50)).max() <= 8


# ------------------------------------------------------------------ 16-bit and float images


def test_a_16_bit_grey_png_decodes_as_its_8_bit_version_not_clipped():
    grey8 = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    grey16 = grey8.astype(np.uint16) * 257  # the same picture at 16 bits
    data16 = encoded(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data16)).mode.startswith("I")  # Pillow opens it as 16-bit
    got = decode_image(data16).rgb
    want = decode_image(encoded(Image.fromarray(grey8), "PNG")).rgb
    assert np.abs(got.astype(int) - want).max() <= 1
    assert len(np.unique(got)) > 250  # a gradient, not black and white


def test_a_16_bit_png_far_larger_than_the_network_is_scaled_then_reduced():
    grey16 = np.tile((np.arange(2048, dtype=np.uint32) * 32).astype(np.uint16), (2048, 1))
    picture = as_picture(encoded(Image.fromarray(grey16), "PNG"), long_side=512)
    assert picture.rgb.shape == (512, 512, 3)
    expected = (grey16[::4, ::4] >> 8).astype(int)  # each 4 x 4 box is 4 ramp steps
    assert np.abs(picture.rgb[..., 0].astype(int) - expected).max() <= 1


def test_a_float_tiff_is_read_as_0_to_1_and_clipped_outside():
    values = np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.5, np.nan]], np.float32)
    rgb = decode_image(encoded(Image.fromarray(values, "F"), "TIFF")).rgb
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255, 255, 0, 0]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])  # grey: the same in every channel


def test_float_and_32_bit_images_already_in_8_bit_range_stay_as_they_are():
    """What ``convert("RGB")`` always read right is not rescaled: a float image of 0..255 and
    a 32-bit integer image holding 8-bit values."""
    floats = np.array([[0.0, 64.0, 128.0, 255.0]], np.float32)
    assert decode_image(encoded(Image.fromarray(floats, "F"), "TIFF")).rgb[0, :, 0].tolist() == [0, 64, 128, 255]
    ints = np.array([[0, 64, 128, 255]], np.int32)
    assert decode_image(encoded(Image.fromarray(ints, "I"), "TIFF")).rgb[0, :, 0].tolist() == [0, 64, 128, 255]


def sixteen_bit_rgb_png(px: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot save one): px (h, w, 3) uint16."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = px.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in px)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png_keeps_its_colours():
    ramp = np.arange(256, dtype=np.uint16) * 257
    px = np.stack([ramp, 65535 - ramp, np.full(256, 32896, np.uint16)], axis=-1)[None].repeat(4, 0)
    rgb = decode_image(sixteen_bit_rgb_png(px)).rgb
    assert np.abs(rgb.astype(int) - (px >> 8)).max() <= 1


def test_a_16_bit_pil_image_given_directly_is_scaled_too():
    grey16 = Image.fromarray(np.tile(np.arange(256, dtype=np.uint16) * 257, (2, 1)))
    assert as_picture(grey16).rgb[0, :, 1].tolist() == list(range(256))


def test_a_requests_images_share_one_pixel_budget():
    from pipeline.errors import BadInputError
    from pipeline.images import PixelBudget

    budget = PixelBudget(limit=100)
    budget.take(8, 8)
    budget.take(6, 6)  # 100 in all: at the limit
    with pytest.raises(BadInputError, match="more than 100 pixels together"):
        budget.take(1, 1)


def test_a_raw_frame_far_larger_than_the_input_is_reduced_before_any_float_tensor():
    """A raw 4K frame (a read-only view of the message, as KServe's raw tensors are) is
    box-averaged on its 8-bit pixels like a decoded one, not made a full-size float tensor;
    a frame under twice the input is used as it is."""
    from pipeline.images import as_picture

    ys, xs = np.mgrid[0:2160, 0:3840]
    frame = np.stack([xs * 255 // 3839, ys * 255 // 2159, (xs + ys) % 256], axis=-1).astype(np.uint8)
    frame[500:1500, 1000:2500] = (200, 40, 40)  # an object with edges
    view = np.frombuffer(frame.tobytes(), np.uint8).reshape(frame.shape)  # read-only
    picture = as_picture(view, long_side=640)
    assert picture.size == (2160, 3840) and max(picture.rgb.shape[:2]) < 2 * 640
    assert picture.rgb.flags.writeable
    reduced, _ = Preprocess(640).tensor(picture)
    full, _ = Preprocess(640).tensor(frame)
    assert float((reduced - full).abs().mean()) < 2 / 255
    small = np.zeros((600, 1000, 3), np.uint8)
    assert as_picture(small, long_side=640).rgb is small


def test_a_raw_frame_waits_in_the_queue_as_a_view_of_its_message():
    """The header check keeps a read-only raw frame as it came (no copy held while it is
    queued); letterboxing copies only what torch needs, and gives the same tensor."""
    from pipeline.images import probe

    frame = np.arange(240 * 320 * 3, dtype=np.uint32).astype(np.uint8).reshape(240, 320, 3)
    view = np.frombuffer(frame.tobytes(), np.uint8).reshape(frame.shape)  # read-only
    source, size = probe(view)
    assert size == (240, 320) and np.shares_memory(source.rgb, view)
    from_view, _ = Preprocess(640).tensor(source)
    from_copy, _ = Preprocess(640).tensor(frame)
    assert bool((from_view == from_copy).all())

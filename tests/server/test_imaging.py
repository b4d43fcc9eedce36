"""server/imaging.py on the bundled cookie photos and variants of them made here with Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from server.imaging import (
    SUPPORTED_CONTENT_TYPES,
    ImageError,
    ImageTooLarge,
    ImageTooSmall,
    UndecodableImage,
    UnsupportedImageType,
    decode_for_model,
    decode_image,
    resize_for_model,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "cookie"
COOKIE = SAMPLES / "train" / "good" / "normal-1.jpg"
ANOMALY = SAMPLES / "test" / "anomaly" / "anomaly-10.jpg"
MAX_PIXELS = 40_000_000
EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height (8-bit RGB) with a few bytes of pixel data: decoding it would fail."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def cookie_rgb() -> np.ndarray:
    with Image.open(COOKIE) as image:
        return np.asarray(image.convert("RGB"))  # (384, 288, 3): portrait


def test_jpeg_decodes_to_pillows_pixels(cookie_rgb: np.ndarray) -> None:
    decoded = decode_image(COOKIE.read_bytes(), content_type="image/jpeg", max_pixels=MAX_PIXELS)
    assert decoded.dtype == np.uint8
    assert decoded.shape == cookie_rgb.shape == (384, 288, 3)
    np.testing.assert_array_equal(decoded, cookie_rgb)


@pytest.mark.parametrize(
    ("fmt", "content_type", "options"),
    [
        ("PNG", "image/png", {}),
        ("BMP", "image/bmp", {}),
        ("TIFF", "image/tiff", {}),
        ("TIFF", "image/tiff", {"compression": "tiff_lzw"}),
        ("WEBP", "image/webp", {"lossless": True}),
    ],
)
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "sniffed"])
def test_lossless_formats_decode_to_the_same_pixels(
    cookie_rgb: np.ndarray, fmt: str, content_type: str, options: dict, declared: bool
) -> None:
    data = encode(Image.fromarray(cookie_rgb), fmt, **options)
    decoded = decode_image(data, content_type=content_type if declared else None, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(decoded, cookie_rgb)


def test_reencoded_jpeg_and_lossy_webp_stay_close(cookie_rgb: np.ndarray) -> None:
    for fmt, content_type in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        data = encode(Image.fromarray(cookie_rgb), fmt, quality=95)
        decoded = decode_image(data, content_type=content_type, max_pixels=MAX_PIXELS)
        assert decoded.shape == cookie_rgb.shape
        assert np.abs(decoded.astype(int) - cookie_rgb).mean() < 3.0, fmt


def test_content_type_parameters_case_and_aliases_are_accepted(cookie_rgb: np.ndarray) -> None:
    data = COOKIE.read_bytes()
    for content_type in ("IMAGE/JPEG; charset=binary", "image/jpg", "application/octet-stream"):
        decoded = decode_image(data, content_type=content_type, max_pixels=MAX_PIXELS)
        np.testing.assert_array_equal(decoded, cookie_rgb)


def test_grayscale_becomes_three_equal_channels(cookie_rgb: np.ndarray) -> None:
    gray = Image.fromarray(cookie_rgb).convert("L")
    decoded = decode_image(encode(gray, "PNG"), content_type="image/png", max_pixels=MAX_PIXELS)
    assert decoded.shape == (*cookie_rgb.shape[:2], 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], np.asarray(gray))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_to_8_bit(cookie_rgb: np.ndarray, fmt: str) -> None:
    gray = np.asarray(Image.fromarray(cookie_rgb).convert("L")).astype(np.uint16)
    deep = Image.fromarray(gray * 257)  # full 16-bit range: 255 -> 65535
    assert deep.mode.startswith("I;16")
    decoded = decode_image(encode(deep, fmt), content_type=None, max_pixels=MAX_PIXELS)
    assert np.abs(decoded[..., 0].astype(int) - gray).max() <= 1
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_rgba_is_composited_over_black(cookie_rgb: np.ndarray) -> None:
    alpha = np.full(cookie_rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:, :100] = 0  # fully transparent left strip
    rgba = Image.fromarray(np.dstack([cookie_rgb, alpha]))
    decoded = decode_image(encode(rgba, "PNG"), content_type="image/png", max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(decoded[:, 100:], cookie_rgb[:, 100:])
    assert decoded[:, :100].max() == 0


def test_palette_image_decodes_to_its_colours(cookie_rgb: np.ndarray) -> None:
    palette = Image.fromarray(cookie_rgb).quantize(colors=64)
    assert palette.mode == "P"
    expected = np.asarray(palette.convert("RGB"))
    for fmt in ("PNG", "BMP"):
        decoded = decode_image(encode(palette, fmt), content_type=None, max_pixels=MAX_PIXELS)
        np.testing.assert_array_equal(decoded, expected)
    assert np.abs(expected.astype(int) - cookie_rgb).mean() < 8.0  # still the cookie


def with_orientation(image: Image.Image, fmt: str, orientation: int, **options) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(image, fmt, exif=exif, **options)


@pytest.mark.parametrize(("orientation", "rotate"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(cookie_rgb: np.ndarray, orientation: int, rotate: int) -> None:
    data = with_orientation(Image.fromarray(cookie_rgb), "PNG", orientation)
    decoded = decode_image(data, content_type="image/png", max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(decoded, np.rot90(cookie_rgb, k=rotate))
    pixels, original_size = decode_for_model(
        data, content_type="image/png", height=64, width=64, max_pixels=MAX_PIXELS
    )
    assert original_size == (decoded.shape[1], decoded.shape[0])
    np.testing.assert_array_equal(pixels, resize_for_model(decoded, 64, 64))


def test_exif_orientation_on_a_drafted_jpeg(cookie_rgb: np.ndarray) -> None:
    big = Image.fromarray(cookie_rgb).resize((1536, 1152), Image.Resampling.BICUBIC)  # drafted at 1/2
    data = with_orientation(big, "JPEG", 6, quality=95)  # displayed rotated 90 degrees clockwise
    pixels, original_size = decode_for_model(
        data, content_type="image/jpeg", height=160, width=96, max_pixels=MAX_PIXELS
    )
    assert original_size == (1152, 1536)  # (width, height) as displayed
    assert pixels.shape == (3, 160, 96)
    expected = resize_for_model(np.ascontiguousarray(np.rot90(np.asarray(big), k=-1)), 160, 96)
    assert np.abs(pixels.astype(int) - expected).mean() < 2.0


def test_decode_for_model_matches_decode_then_resize() -> None:
    data = ANOMALY.read_bytes()
    pixels, original_size = decode_for_model(
        data, content_type="image/jpeg", height=256, width=256, max_pixels=MAX_PIXELS
    )
    full = decode_image(data, content_type="image/jpeg", max_pixels=MAX_PIXELS)
    assert original_size == (full.shape[1], full.shape[0])
    np.testing.assert_array_equal(pixels, resize_for_model(full, 256, 256))


def test_big_jpeg_draft_stays_close_to_the_full_decode(cookie_rgb: np.ndarray) -> None:
    big = Image.fromarray(cookie_rgb).resize((2304, 1728), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=92)
    pixels, original_size = decode_for_model(
        data, content_type="image/jpeg", height=256, width=256, max_pixels=MAX_PIXELS
    )
    assert original_size == (2304, 1728)
    reference = resize_for_model(
        decode_image(data, content_type="image/jpeg", max_pixels=MAX_PIXELS), 256, 256
    )
    difference = np.abs(pixels.astype(int) - reference)
    assert difference.mean() < 1.0
    assert difference.max() <= 12


def test_server_preprocessing_matches_training() -> None:
    """No train/serve skew: the server feeds the model the same pixels training saw."""
    pytest.importorskip("torch")
    from training.images import load_image_tensor

    for path in (COOKIE, ANOMALY):
        expected = load_image_tensor(path, 256).numpy()  # (3, 256, 256)
        pixels, _ = decode_for_model(
            path.read_bytes(), content_type="image/jpeg", height=256, width=256, max_pixels=MAX_PIXELS
        )
        np.testing.assert_array_equal(pixels, expected)


def test_resize_for_model_shape_dtype_and_content(cookie_rgb: np.ndarray) -> None:
    resized = resize_for_model(cookie_rgb, 128, 192)
    assert resized.shape == (3, 128, 192)
    assert resized.dtype == np.uint8
    assert resized.flags.c_contiguous
    expected = np.asarray(Image.fromarray(cookie_rgb).resize((192, 128), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized, expected.transpose(2, 0, 1))
    uniform = np.full((300, 500, 3), (10, 200, 30), dtype=np.uint8)
    np.testing.assert_array_equal(resize_for_model(uniform, 64, 64)[:, 5, 7], [10, 200, 30])
    with pytest.raises(ValueError, match="uint8"):
        resize_for_model(cookie_rgb.astype(np.float32), 64, 64)


@pytest.mark.parametrize("size", [(1, 1), (15, 300), (300, 15)])
def test_too_small_images_are_refused(size: tuple[int, int]) -> None:
    data = encode(Image.new("RGB", size, (255, 0, 0)), "PNG")
    with pytest.raises(ImageTooSmall, match=f"{size[0]}x{size[1]}"):
        decode_image(data, content_type="image/png", max_pixels=MAX_PIXELS, min_side=16)
    assert decode_image(data, content_type="image/png", max_pixels=MAX_PIXELS, min_side=1).shape[:2] == (
        size[1],
        size[0],
    )


@pytest.mark.parametrize("size", [(30000, 30000), (8000, 6000)])
def test_too_many_pixels_refused_from_the_header(size: tuple[int, int]) -> None:
    """The file holds a few bytes of pixels: had it been decoded, the error would be UndecodableImage."""
    data = png_header_only(*size)
    assert len(data) < 200
    with pytest.raises(ImageTooLarge, match="too large"):
        decode_image(data, content_type="image/png", max_pixels=MAX_PIXELS)
    with pytest.raises(ImageTooLarge):
        decode_for_model(data, content_type=None, height=256, width=256, max_pixels=MAX_PIXELS)


def test_header_only_png_within_the_limit_is_undecodable() -> None:
    with pytest.raises(UndecodableImage):
        decode_image(png_header_only(2000, 1000), content_type="image/png", max_pixels=MAX_PIXELS)


def test_max_pixels_applies_to_real_images() -> None:
    data = COOKIE.read_bytes()  # 288 x 384 = 110592 pixels
    with pytest.raises(ImageTooLarge, match="110592"):
        decode_image(data, content_type="image/jpeg", max_pixels=100_000)
    assert decode_image(data, content_type="image/jpeg", max_pixels=110_592).shape == (384, 288, 3)


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize(("fmt", "content_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_truncated_files_are_undecodable(
    cookie_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch, load_truncated: bool, fmt: str, content_type: str
) -> None:
    """Even when someone sets Pillow's LOAD_TRUNCATED_IMAGES, which would pad the image silently."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = encode(Image.fromarray(cookie_rgb), fmt)
    truncated = data[: len(data) * 2 // 3]
    with pytest.raises(UndecodableImage, match="truncated"):
        decode_image(truncated, content_type=content_type, max_pixels=MAX_PIXELS)
    with pytest.raises(UndecodableImage, match="truncated"):
        decode_for_model(truncated, content_type=content_type, height=64, width=64, max_pixels=MAX_PIXELS)


def test_text_sent_as_jpeg_is_undecodable() -> None:
    with pytest.raises(UndecodableImage, match="image/jpeg"):
        decode_image(b"hello, this is not a picture\n" * 20, content_type="image/jpeg", max_pixels=MAX_PIXELS)
    with pytest.raises(UndecodableImage):
        decode_image(b"plain text", content_type=None, max_pixels=MAX_PIXELS)
    with pytest.raises(UndecodableImage, match="empty"):
        decode_image(b"", content_type="image/png", max_pixels=MAX_PIXELS)


def test_a_png_declared_as_jpeg_is_named_in_the_error(cookie_rgb: np.ndarray) -> None:
    data = encode(Image.fromarray(cookie_rgb), "PNG")
    with pytest.raises(UndecodableImage, match="PNG"):
        decode_image(data, content_type="image/jpeg", max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("content_type", ["text/plain", "image/gif", "application/json", "image/svg+xml"])
def test_content_types_outside_the_list_are_unsupported(content_type: str) -> None:
    with pytest.raises(UnsupportedImageType, match="image/jpeg"):
        decode_image(COOKIE.read_bytes(), content_type=content_type, max_pixels=MAX_PIXELS)


def test_a_sniffed_gif_is_unsupported(cookie_rgb: np.ndarray) -> None:
    data = encode(Image.fromarray(cookie_rgb), "GIF")
    with pytest.raises(UnsupportedImageType, match="GIF"):
        decode_image(data, content_type=None, max_pixels=MAX_PIXELS)
    with pytest.raises(UndecodableImage):
        decode_image(data, content_type="image/png", max_pixels=MAX_PIXELS)


def test_error_hierarchy() -> None:
    assert set(SUPPORTED_CONTENT_TYPES) == {
        "image/jpeg",
        "image/png",
        "image/bmp",
        "image/tiff",
        "image/webp",
    }
    for error in (UndecodableImage, UnsupportedImageType, ImageTooLarge, ImageTooSmall):
        assert issubclass(error, ImageError)
        assert issubclass(error, ValueError)

"""server/jpeg.py: the libjpeg-turbo path gives Pillow's pixels exactly and leaves the rest to Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server import jpeg
from server.imaging import UndecodableImage, decode_for_model

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "cookie"
CAMERA = REPO.parent / "shared" / "data" / "cookie" / "test" / "anomaly" / "anomaly-10.jpg"
MAX_PIXELS = 40_000_000
EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def both_paths(data: bytes, height: int = 256, width: int = 256) -> tuple[tuple, tuple]:
    common = {"content_type": "image/jpeg", "height": height, "width": width, "max_pixels": MAX_PIXELS}
    return decode_for_model(data, **common), decode_for_model(data, **common, fast_jpeg=False)


def cookie() -> Image.Image:
    with Image.open(SAMPLES / "test" / "anomaly" / "anomaly-10.jpg") as image:
        return image.convert("RGB")  # 288 x 384


# the bundled photo as it is, the camera-size photo, and sizes that Pillow drafts at 1/2, 1/4 and 1/8
@pytest.mark.parametrize("side", [None, 512, 1100, 2100, 4200])
def test_fast_path_gives_pillows_pixels_and_size(side: int | None) -> None:
    image = cookie()
    data = (SAMPLES / "test" / "anomaly" / "anomaly-10.jpg").read_bytes()
    if side is not None:
        data = encode(image.resize((side, side * 4 // 3), Image.Resampling.BICUBIC), quality=90)
    assert jpeg.read_header(data) is not None  # it does take this image
    (fast, fast_size), (pillow, pillow_size) = both_paths(data)
    assert fast_size == pillow_size
    assert fast.shape == (3, 256, 256) and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, pillow)


def test_camera_photo_and_non_square_model_input() -> None:
    data = CAMERA.read_bytes() if CAMERA.is_file() else encode(cookie().resize((576, 768)), quality=90)
    (fast, size), (pillow, pillow_size) = both_paths(data, height=160, width=96)
    assert size == pillow_size and fast.shape == (3, 160, 96)
    np.testing.assert_array_equal(fast, pillow)


def test_progressive_and_gray_jpegs() -> None:
    image = cookie()
    for data in (encode(image, quality=85, progressive=True), encode(image.convert("L"), quality=90)):
        assert jpeg.read_header(data) is not None
        (fast, _), (pillow, _) = both_paths(data)
        np.testing.assert_array_equal(fast, pillow)


def test_rotated_and_cmyk_jpegs_go_to_pillow() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    rotated = encode(cookie(), quality=90, exif=exif)
    assert jpeg.exif_orientation(rotated) == 6
    (fast, size), _ = both_paths(rotated)
    assert size == (384, 288)  # displayed: turned by 90 degrees, as Pillow's path does it

    cmyk = encode(cookie().convert("CMYK"), quality=90)
    assert jpeg.read_header(cmyk) is None
    (fast, _), (pillow, _) = both_paths(cmyk)
    np.testing.assert_array_equal(fast, pillow)


def test_exif_without_rotation_takes_the_fast_path() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 1
    exif[0x010F] = "camera maker"
    data = encode(cookie(), quality=90, exif=exif)
    assert jpeg.exif_orientation(data) == 1
    assert jpeg.exif_orientation(b"\xff\xd8\xff\xe1\x00\x08Exif\x00\x00") == 1  # cut short: no rotation


def test_truncated_jpeg_still_gets_pillows_error() -> None:
    data = encode(cookie(), quality=90)
    truncated = data[: len(data) // 2]
    assert jpeg.decode_scaled(truncated, 288, 384, 512, 512) is None  # libjpeg-turbo refuses it
    with pytest.raises(UndecodableImage, match="truncated"):
        decode_for_model(truncated, content_type="image/jpeg", height=256, width=256, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("size", "minimum", "expected"),
    [((256, 256), (512, 512), 1), ((1024, 1024), (512, 512), 2), ((2100, 2800), (512, 512), 4),
     ((4200, 5600), (512, 512), 8), ((9000, 9000), (512, 512), 8), ((1023, 4000), (512, 512), 1)],
)  # fmt: skip
def test_draft_scale_is_pillows(size: tuple[int, int], minimum: tuple[int, int], expected: int) -> None:
    assert jpeg.pillow_draft_scale(*size, *minimum) == expected

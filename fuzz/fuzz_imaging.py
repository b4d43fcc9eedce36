"""Coverage-guided fuzzing (atheris) of the server's image path: `server.imaging.decode_for_model`.

    python fuzz/fuzz_imaging.py CORPUS_DIR -runs=100000 -max_len=65536      (or: make fuzz)

One fuzz input = one selector byte (which Content-Type the request declares: none, or one of the
supported ones) + the request body. The property: decode_for_model either returns a
(3, 64, 64) uint8 array with the image's (width, height) inside the limits, or raises an ImageError
subclass (which the server turns into 400/413/415). Any other exception, a wrong shape or dtype is a
finding; libFuzzer writes the input to `crash-<sha1>`, and it belongs in
tests/reliability/fuzz_regressions/ (replayed by tests/reliability/test_fuzz.py).

Pillow's and this project's Python code are instrumented (coverage guides the mutations); the C
decoders (libjpeg-turbo, libpng/zlib, libtiff, libwebp) are exercised but not instrumented.
`--make-seeds DIR` writes small valid images of every supported kind (and some unsupported ones) to
start the corpus from.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL_SIDE = 64
MAX_PIXELS = 1_000_000  # lower than the server default (40 M) so each input stays fast; same code path
MIN_SIDE = 16
CONTENT_TYPES = (None, "image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp")


def split_input(data: bytes) -> tuple[str | None, bytes]:
    """(declared content type, body) from one fuzz input."""
    if not data:
        return None, b""
    return CONTENT_TYPES[data[0] % len(CONTENT_TYPES)], data[1:]


def check_one_input(data: bytes) -> None:
    """Run one input through decode_for_model; raise AssertionError (or the unexpected error) on a bug."""
    from server.imaging import ImageError, decode_for_model

    content_type, body = split_input(data)
    try:
        pixels, (width, height) = decode_for_model(
            body,
            content_type=content_type,
            height=MODEL_SIDE,
            width=MODEL_SIDE,
            max_pixels=MAX_PIXELS,
            min_side=MIN_SIDE,
        )
    except ImageError:
        return  # a clean refusal: 400, 413 or 415
    assert pixels.shape == (3, MODEL_SIDE, MODEL_SIDE), pixels.shape
    assert pixels.dtype == np.uint8, pixels.dtype
    assert pixels.flags["C_CONTIGUOUS"]
    assert min(width, height) >= MIN_SIDE and width * height <= MAX_PIXELS, (width, height)


def seed_inputs() -> dict[str, bytes]:
    """Small valid images of every supported kind and a few tricky ones, each prefixed with a selector."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))
    seeds: dict[str, bytes] = {}

    def add(
        name: str, image: Image.Image, format_name: str, content_type: str | None, **options: object
    ) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format=format_name, **options)
        seeds[name] = bytes([CONTENT_TYPES.index(content_type)]) + buffer.getvalue()

    add("jpeg", rgb, "JPEG", "image/jpeg", quality=80)
    add("jpeg-progressive", rgb, "JPEG", None, quality=80, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    add("jpeg-exif-rotated", rgb, "JPEG", "image/jpeg", exif=exif.tobytes())
    add("png", rgb, "PNG", "image/png")
    add("png-rgba", rgb.convert("RGBA"), "PNG", None)
    add("png-palette", rgb.convert("P"), "PNG", "image/png", transparency=0)
    gray16 = Image.fromarray(rng.integers(0, 65536, size=(24, 32), dtype=np.uint16))
    add("png-16bit", gray16, "PNG", "image/png")
    add("bmp", rgb, "BMP", "image/bmp")
    add("tiff", rgb, "TIFF", "image/tiff")
    add("tiff-deflate", rgb, "TIFF", None, compression="tiff_adobe_deflate")
    add("webp", rgb, "WEBP", "image/webp", quality=80)
    add("webp-lossless", rgb.convert("RGBA"), "WEBP", None, lossless=True)
    add("gif-unsupported", rgb.convert("P"), "GIF", None)
    return seeds


def write_seeds(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seed_inputs().items():
        (folder / f"seed-{name}").write_bytes(data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        write_seeds(Path(sys.argv[2]))
        return
    import atheris

    with atheris.instrument_imports(include=["PIL", "server"]):
        import PIL.Image

        import server.imaging  # noqa: F401

        PIL.Image.init()  # imports every format plugin now, inside the instrumented block

    def test_one_input(data: bytes) -> None:
        check_one_input(data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

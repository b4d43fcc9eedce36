"""Benchmark inputs made from real cookie photos: JPEG files at fixed sizes and model-size batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from efficientad.errors import UserError

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples" / "cookie"
DEFAULT_IMAGE = SAMPLES_DIR / "test" / "anomaly" / "anomaly-10.jpg"
JPEG_QUALITY = 90


def source_image(path: Path | None) -> Path:
    """The photo every input is made from: `path`, or a bundled cookie image."""
    chosen = Path(path) if path is not None else DEFAULT_IMAGE
    if not chosen.is_file():
        raise UserError(f"benchmark image not found: {chosen} (pass --image PATH to a JPEG/PNG photo)")
    return chosen


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read benchmark image {path}: {error}") from None


def jpeg_bytes(image: Image.Image, side: int) -> bytes:
    """`image` resized (bicubic) to side x side and JPEG-encoded at quality 90."""
    buffer = io.BytesIO()
    image.resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_jpegs(source: Path, sides: list[int], out_dir: Path) -> dict[int, Path]:
    """`out_dir/cookie-<side>.jpg` for each side; returns {side: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image = load_rgb(source)
    paths = {}
    for side in sides:
        path = out_dir / f"cookie-{side}.jpg"
        path.write_bytes(jpeg_bytes(image, side))
        paths[side] = path
    return paths


def model_batch(source: Path, batch_size: int, height: int, width: int) -> np.ndarray:
    """(batch_size, 3, height, width) uint8: the photo at model size, repeated (timing does not depend on
    the pixel values, but real pixels keep the outputs meaningful)."""
    image = load_rgb(source).resize((width, height), Image.Resampling.BILINEAR)
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
    return np.ascontiguousarray(np.broadcast_to(chw, (batch_size, *chw.shape)))  # (N, 3, H, W)

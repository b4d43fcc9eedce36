"""Reading image files for training: any folder of images, any common mode, as RGB at the input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from efficientad.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class DataError(UserError):
    """A data folder or image file that cannot be used, named in the message."""


def list_images(folder: Path) -> list[Path]:
    """Sorted image files directly in `folder`; an error if the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; grayscale, RGBA, palette and 16-bit images to 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode one image file to RGB; a DataError naming the path if it cannot be read."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None


def to_uint8_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) uint8 tensor, resized bilinearly (antialiased)."""
    resized = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def load_image_tensor(path: Path, size: int) -> torch.Tensor:
    """File -> (3, size, size) uint8 RGB tensor."""
    return to_uint8_tensor(load_rgb(path), size)

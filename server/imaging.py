"""Request bytes -> RGB pixels at the model's input size: decode, check, orient, convert, resize.

Pure functions on numpy + Pillow. The checks happen in the cheapest order: the format and the pixel
count come from the header (Image.open reads nothing else), so a decompression bomb is refused before a
single pixel is allocated. Big JPEGs decode at a DCT-reduced scale (`Image.draft`) when the model input
is much smaller, which is most of the decode time saved on camera-sized images.

Common JPEGs (YCbCr or gray, not rotated by EXIF) take the fast path (server.jpeg: libjpeg-turbo via
simplejpeg, the same scale and the same pixels as Pillow, about half the time, GIL released); anything
it does not take, including every bad input, goes through Pillow as before.

The conversion to RGB mirrors `training.images.to_rgb` (which needs torch, so it is not imported here):
EXIF orientation, 16-bit scaled to 8-bit, alpha composited over black, then RGB.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server import jpeg

logger = logging.getLogger(__name__)

SUPPORTED_CONTENT_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/tiff", "image/webp")
# The Content-Type of an image file by its suffix (the `predict` client and `calibrate` read files).
CONTENT_TYPES_BY_SUFFIX = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
}
IMAGE_SUFFIXES = tuple(CONTENT_TYPES_BY_SUFFIX)  # .jpg .jpeg .png .bmp .tif .tiff .webp


def content_type_for(path: Path) -> str:
    """The Content-Type for an image file's suffix; unknown suffixes let the server detect the format."""
    return CONTENT_TYPES_BY_SUFFIX.get(path.suffix.lower(), "application/octet-stream")


# Pillow's opener for each content type (its JPEG opener also reads multi-picture JPEGs, format "MPO").
_FORMATS_BY_CONTENT_TYPE = {
    "image/jpeg": ("JPEG",),
    "image/png": ("PNG",),
    "image/bmp": ("BMP",),
    "image/tiff": ("TIFF",),
    "image/webp": ("WEBP",),
}
# Names that clients send for the same formats.
_CONTENT_TYPE_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
    "image/tif": "image/tiff",
    "image/x-tiff": "image/tiff",
}
# No content type (or a generic one): the format is read from the bytes, among the supported ones only.
_SNIFFED_CONTENT_TYPES = ("", "application/octet-stream", "binary/octet-stream")
_ALL_FORMATS = tuple(name for names in _FORMATS_BY_CONTENT_TYPE.values() for name in names)
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112
# Decode big JPEGs at no less than this multiple of the model input before the antialiased resize.
_DRAFT_MARGIN = 2
# Pillow's two-step resize (integer box reduce, then bilinear): near-identical output, much faster on
# large downscales; it only acts when the image is at least this many times the target size.
_REDUCING_GAP = 3.0


class ImageError(ValueError):
    """An image in a request that cannot be used; the message says why (shown to the client)."""


class UndecodableImage(ImageError):
    """Not a valid image of the declared format: corrupt, truncated, or another kind of file (HTTP 400)."""


class UnsupportedImageType(ImageError):
    """A content type (or a sniffed format) outside SUPPORTED_CONTENT_TYPES (HTTP 415)."""


class ImageTooLarge(ImageError):
    """More pixels than allowed, found from the header before decoding (HTTP 413)."""


class ImageTooSmall(ImageError):
    """A side shorter than the minimum (HTTP 400)."""


class _TruncationWatch(io.BytesIO):
    """Counts reads that found no data left: a decoder asking past the end means a truncated file.

    Pillow hides truncation when `ImageFile.LOAD_TRUNCATED_IMAGES` is set by anyone in the process;
    this makes the check independent of that global.
    """

    empty_reads = 0

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if not chunk and size != 0:
            self.empty_reads += 1
        return chunk


def normalise_content_type(content_type: str | None) -> str:
    """'image/JPEG; q=1' -> 'image/jpeg'; None -> ''; aliases such as image/jpg to their standard name."""
    if content_type is None:
        return ""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return _CONTENT_TYPE_ALIASES.get(media_type, media_type)


def _open_checked(
    data: bytes, content_type: str | None, max_pixels: int, min_side: int
) -> tuple[Image.Image, _TruncationWatch]:
    """Open (header only) and check the type, the pixel count and the size; no pixel data is decoded."""
    media_type = normalise_content_type(content_type)
    if media_type in _SNIFFED_CONTENT_TYPES:
        allowed_formats = _ALL_FORMATS
    elif media_type in _FORMATS_BY_CONTENT_TYPE:
        allowed_formats = _FORMATS_BY_CONTENT_TYPE[media_type]
    else:
        raise UnsupportedImageType(
            f"unsupported content type {content_type!r}: send one of {', '.join(SUPPORTED_CONTENT_TYPES)}"
        )
    if not data:
        raise UndecodableImage("empty body: no image data")

    stream = _TruncationWatch(data)
    try:
        image = Image.open(stream, formats=allowed_formats)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image too large: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise _not_an_image_error(data, media_type, error) from None

    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(
            f"image too large: {width}x{height} = {width * height} pixels, the limit is {max_pixels}"
        )
    if min(width, height) < min_side:
        image.close()
        raise ImageTooSmall(f"image too small: {width}x{height}, each side must be at least {min_side} px")
    return image, stream


def _not_an_image_error(data: bytes, media_type: str, error: Exception) -> ImageError:
    """The error for bytes that did not open as the declared format, naming the real format when known."""
    reason = "unknown or corrupt header" if isinstance(error, UnidentifiedImageError) else str(error)
    if media_type in _SNIFFED_CONTENT_TYPES:
        detected = _detect_format(data, formats=None)
        if detected is not None:
            return UnsupportedImageType(
                f"unsupported image format {detected}: send one of {', '.join(SUPPORTED_CONTENT_TYPES)}"
            )
        return UndecodableImage(f"not a decodable image ({len(data)} bytes): {reason}")
    detected = _detect_format(data, formats=_ALL_FORMATS)
    if detected is not None:
        return UndecodableImage(f"Content-Type is {media_type} but the body is a {detected} image")
    return UndecodableImage(f"not a valid {media_type} image ({len(data)} bytes): {reason}")


def _detect_format(data: bytes, formats: tuple[str, ...] | None) -> str | None:
    """Which image format the bytes are (header only), or None; only used to word an error message."""
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            return image.format
    except Exception:  # any failure just means "unknown format"
        return None


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: decode the image as stored
        return 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied."""
    width, height = size
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def _load_rgb(image: Image.Image, stream: _TruncationWatch) -> Image.Image:
    """Decode the pixels, then orient and convert to 8-bit RGB; UndecodableImage on corrupt/truncated data."""
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise UndecodableImage(f"cannot decode the {image.format} image: {error}") from None
    if stream.empty_reads:
        raise UndecodableImage(f"cannot decode the {image.format} image: the file is truncated")
    try:
        return _to_rgb(image)
    except (OSError, ValueError) as error:
        message = f"cannot convert the {image.format} image ({image.mode}) to RGB: {error}"
        raise UndecodableImage(message) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; grayscale, RGBA, palette and 16-bit images to 8-bit RGB (as in training)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def decode_image(data: bytes, *, content_type: str | None, max_pixels: int, min_side: int = 16) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB at full resolution, EXIF orientation applied.

    `content_type` None or application/octet-stream: the format is read from the bytes.
    Raises UnsupportedImageType, UndecodableImage, ImageTooLarge or ImageTooSmall (all ImageError).
    """
    image, stream = _open_checked(data, content_type, max_pixels, min_side)
    with image:
        rgb = _load_rgb(image, stream)
    return np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)


def _resize_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL RGB image -> (3, height, width) uint8, bilinear with antialiasing (Pillow's resize)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)
    pixels = np.asarray(image, dtype=np.uint8)  # (height, width, 3)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, height, width)


def resize_for_model(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, height, width) uint8, resized bilinearly (antialiased) like training."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return _resize_rgb(Image.fromarray(image), height, width)


def decode_for_model(
    data: bytes,
    *,
    content_type: str | None,
    height: int,
    width: int,
    max_pixels: int,
    min_side: int = 16,
    fast_jpeg: bool = True,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes -> ((3, height, width) uint8 RGB for the model, the original (width, height)).

    A JPEG much larger than the model input decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling),
    never below twice the model input, so the antialiased resize that follows sees enough pixels.
    The original size is the displayed one (after EXIF orientation), for heatmaps at original size.
    `fast_jpeg=False` decodes every JPEG with Pillow (the reference the fast path is tested against).
    """
    fast = _decode_common_jpeg(data, content_type, height, width, max_pixels, min_side) if fast_jpeg else None
    if fast is not None:
        return fast
    image, stream = _open_checked(data, content_type, max_pixels, min_side)
    with image:
        if image.format not in ("JPEG", "MPO"):
            rgb = _load_rgb(image, stream)
            return _resize_rgb(rgb, height, width), rgb.size
        # A JPEG's EXIF is read with its header; other formats may decode pixels to find theirs.
        orientation = _exif_orientation(image)
        original_size = _oriented_size(image.size, orientation)
        # draft works in stored (unrotated) coordinates
        draft_w, draft_h = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
        image.draft("RGB", (_DRAFT_MARGIN * draft_w, _DRAFT_MARGIN * draft_h))
        rgb = _load_rgb(image, stream)
    return _resize_rgb(rgb, height, width), original_size


def _decode_common_jpeg(
    data: bytes, content_type: str | None, height: int, width: int, max_pixels: int, min_side: int
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """decode_for_model's answer through server.jpeg, or None for anything that path does not take
    (including every image that breaks a limit: Pillow's path words those errors)."""
    if normalise_content_type(content_type) not in ("image/jpeg", *_SNIFFED_CONTENT_TYPES):
        return None
    header = jpeg.read_header(data)
    if header is None:
        return None
    image_width, image_height, _ = header
    if image_width * image_height > max_pixels or min(image_width, image_height) < min_side:
        return None
    if jpeg.exif_orientation(data) != 1:
        return None
    pixels = jpeg.decode_scaled(
        data, image_width, image_height, _DRAFT_MARGIN * width, _DRAFT_MARGIN * height
    )
    if pixels is None:
        return None
    if pixels.shape[:2] == (height, width):
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)), (image_width, image_height)  # (3, H, W)
    return _resize_rgb(Image.fromarray(pixels), height, width), (image_width, image_height)

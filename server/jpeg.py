"""The fast JPEG path: libjpeg-turbo through simplejpeg, with DCT-domain downscaling, GIL released.

Only the common case goes this way: a baseline or progressive YCbCr or gray JPEG with no EXIF rotation.
Everything else (CMYK, rotated photos, corrupt or truncated data) answers None and the caller decodes
with Pillow, which gives the documented error messages. On the images it takes,
the pixels are identical to Pillow's (same library, same default DCT and upsampling, same scale factor).
"""

from __future__ import annotations

import logging
import struct

import numpy as np
import simplejpeg

logger = logging.getLogger(__name__)

_FAST_COLOURSPACES = frozenset({"YCbCr", "Gray"})
_SOI = b"\xff\xd8"
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112
_PILLOW_SCALES = (8, 4, 2, 1)  # Image.draft's choices (libjpeg offers more; these keep Pillow's pixels)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of a JPEG from its APP1 segment, 1 when absent or unreadable."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return 1
        marker = data[position + 1]
        if marker in (_SOS, _EOI):
            return 1
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        if marker == _APP1 and segment.startswith(_EXIF_HEADER):
            return _tiff_orientation(segment[len(_EXIF_HEADER) :])
        position += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (entries,) = struct.unpack_from(order + "H", tiff, ifd)
        for index in range(entries):
            tag, kind, _count = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * index)
            if tag == _ORIENTATION_TAG and kind == 3:  # SHORT
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * index + 8)
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        return 1
    return 1


def pillow_draft_scale(width: int, height: int, min_width: int, min_height: int) -> int:
    """The factor Pillow's `Image.draft` picks: the largest of 8, 4, 2, 1 that keeps both sides >= the
    requested minimum."""
    fits = min(width // max(1, min_width), height // max(1, min_height))
    return next(scale for scale in _PILLOW_SCALES if fits >= scale or scale == 1)


def read_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, colourspace) of a JPEG the fast path can take, or None."""
    if not data.startswith(_SOI):
        return None
    try:
        height, width, colourspace, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in _FAST_COLOURSPACES:
        return None
    return int(width), int(height), str(colourspace)


def decode_scaled(data: bytes, width: int, height: int, min_width: int, min_height: int) -> np.ndarray | None:
    """(h, w, 3) uint8 RGB at Pillow's draft scale for (min_width, min_height), or None when libjpeg-turbo
    refuses (corrupt or truncated data: the caller's Pillow path then says what is wrong)."""
    scale = pillow_draft_scale(width, height, min_width, min_height)
    try:
        return simplejpeg.decode_jpeg(  # type: ignore[no-any-return]
            data,
            colorspace="RGB",
            min_factor=scale,
            min_height=-(-height // scale),
            min_width=-(-width // scale),
            strict=True,
        )
    except ValueError as error:
        logger.debug("simplejpeg refused the image (%s); decoding with Pillow", error)
        return None

"""Decoding and checking user images before any model work is spent on them."""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, ImageOps

from .errors import InputError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")


def load_image(source: bytes | str | os.PathLike, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Open, fully decode and validate an image; raise InputError("image", ...) on anything unusable.

    Decoding happens here (not lazily later) so truncated files fail before a job starts, and the pixel
    limit is checked from the header before decoding, which stops decompression bombs.
    """
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise InputError("image", f"cannot read {source}: {exc.strerror}") from None
    with handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle)
                if image.format not in ACCEPTED_FORMATS:
                    raise InputError("image", f"unsupported format {image.format}; use JPEG, PNG or WebP")
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError("image", f"{width}x{height} exceeds the {max_pixels} pixel limit")
                image.load()
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError("image", "image is too large to decode safely") from None
        except Exception as exc:  # PIL raises many types for corrupt data
            raise InputError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    return ImageOps.exif_transpose(image).convert("RGB")


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` and centre-crop: the SD input the inversion expects."""
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)

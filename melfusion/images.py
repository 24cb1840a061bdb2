"""Decoding and checking user images before any model work is spent on them."""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, ImageOps

from .errors import InputError

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")


def open_image(source: bytes | str | os.PathLike, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Open an image lazily (its header only) and check its format and pixel count before any decoding.

    Raises:
        InputError: ("image", ...) for an unreadable header, another format, or too many pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except OSError as exc:
        if not isinstance(source, bytes) and exc.strerror:  # a path that cannot be read, not a bad image
            raise InputError("image", f"cannot read {source}: {exc.strerror}") from None
        raise InputError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError("image", "image is too large to decode safely") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise InputError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise InputError("image", f"unsupported format {image.format}; use JPEG, PNG or WebP")
    width, height = image.size
    if width * height > max_pixels:
        raise InputError("image", f"{width}x{height} exceeds the {max_pixels} pixel limit")
    return image


def check_image(data: bytes, *, max_pixels: int = 40_000_000) -> None:
    """Refuse what the worker could not decode, without decoding it here: the HTTP side's check.

    Memory stays proportional to the upload, never to the pixels: the header gives format and size; a
    PNG's chunks are walked and CRC-checked (`verify`, no inflating); a JPEG is decoded at 1/8 scale
    (`draft`). WebP gets the header check only; a corrupt body then fails its job as invalid input.

    Raises:
        InputError: ("image", ...) naming what is wrong.
    """
    image = open_image(data, max_pixels=max_pixels)
    try:
        if image.format == "JPEG":
            image.draft("RGB", (1, 1))  # the smallest scale libjpeg offers (1/8 per side)
            image.load()
        else:
            image.verify()
    except Exception as exc:
        raise InputError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    finally:
        image.close()


def load_image(
    source: bytes | str | os.PathLike, *, max_pixels: int = 40_000_000, min_side: int | None = None
) -> Image.Image:
    """Open, fully decode and validate an image; raise InputError("image", ...) on anything unusable.

    Decoding happens here (not lazily later) so truncated files fail before a job starts, and the pixel
    limit is checked from the header before decoding, which stops decompression bombs. With `min_side`,
    the image is shrunk right after decoding (a JPEG already while decoding) to no less than twice that
    short side, so one full-size copy exists only briefly: peak memory is about 4 bytes per header pixel.
    """
    image = open_image(source, max_pixels=max_pixels)
    try:
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", (2 * min_side, 2 * min_side))  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
        image.load()
        if min_side is not None:
            factor = min(image.size) // (2 * min_side)
            if factor > 1:
                image = image.reduce(factor)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise InputError("image", f"not a readable image ({type(exc).__name__}: {exc})") from None
    return ImageOps.exif_transpose(image).convert("RGB")


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to `resolution` and centre-crop: the SD input the inversion expects."""
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)

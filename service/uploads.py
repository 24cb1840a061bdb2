"""Reading the uploaded image: size limit, type sniffed from the bytes (never trusted from the client)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import UploadFile

from .errors import PayloadTooLarge, UnsupportedMediaType


@dataclass(frozen=True)
class ImageType:
    mime: str
    extension: str


PNG = ImageType("image/png", "png")
JPEG = ImageType("image/jpeg", "jpg")
WEBP = ImageType("image/webp", "webp")
_UNCHECKED_DECLARATIONS = {None, "", "application/octet-stream"}


def sniff_image_type(data: bytes) -> ImageType | None:
    """The accepted format the magic bytes announce, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    return None


def read_image_upload(upload: UploadFile, *, max_bytes: int) -> tuple[bytes, ImageType]:
    """The upload's bytes and sniffed type; 413 past `max_bytes`, 415 for other or mislabelled types."""
    data = upload.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image larger than {max_bytes} bytes", field="image")
    sniffed = sniff_image_type(data)
    if sniffed is None:
        raise UnsupportedMediaType("image must be JPEG, PNG or WebP (judged from its bytes)", field="image")
    declared = upload.content_type
    if declared not in _UNCHECKED_DECLARATIONS and declared != sniffed.mime:
        raise UnsupportedMediaType(f"declared {declared} but the bytes are {sniffed.mime}", field="image")
    return data, sniffed

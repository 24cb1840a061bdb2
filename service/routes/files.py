"""/files: the local store's downloads, behind expiring HMAC-signed URLs (mounted only for a store whose
links lead here: `Storage.serves_via_api`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from jobs.storage import AUDIO_CONTENT_TYPES, PNG, StorageKeyInvalid, check_key, content_type_of

from ..deps import StorageDep
from ..errors import ErrorResponse, JobNotFound, LinkInvalid

router = APIRouter(tags=["files"])


@router.get(
    "/files/{key:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {**{kind: {} for kind in AUDIO_CONTENT_TYPES}, PNG: {}}},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
    },
)
def download_file(key: str, expires: Annotated[int, Query()], signature: Annotated[str, Query()], storage: StorageDep):
    try:
        check_key(key)
    except StorageKeyInvalid:
        raise JobNotFound("no such file", field="key") from None
    if not key.startswith("outputs/") or not storage.is_valid_signature(key, expires=expires, signature=signature):
        raise LinkInvalid("the link is invalid or has expired; GET the job for a fresh one", field="signature")
    path = storage.path(key)
    if not path.is_file():
        raise JobNotFound("no such file", field="key")
    return FileResponse(path, media_type=content_type_of(key))

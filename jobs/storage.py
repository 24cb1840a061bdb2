"""Where input images and output clips live: one interface, a local directory or an S3-compatible store.

Keys are made server-side only (`input_key`, `output_key`); clients get time-limited URLs, never keys:
presigned GETs for S3, HMAC-signed `/files/...` URLs (served by the API) for the local directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlencode

from melfusion.formats import AUDIO_FORMATS, DEFAULT_FORMAT, format_of_extension
from melfusion.files import write_atomically

from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
WAV = AUDIO_FORMATS["wav"].content_type
PNG = "image/png"
AUDIO_CONTENT_TYPES = tuple(dict.fromkeys(f.content_type for f in AUDIO_FORMATS.values()))
_AUDIO_EXTENSIONS = "|".join(f.extension for f in AUDIO_FORMATS.values())
_SAFE_KEY = re.compile(rf"^(inputs|outputs)/[A-Za-z0-9-]+(\.[0-9])?\.(png|jpg|webp|{_AUDIO_EXTENSIONS})$")


class StorageUnavailable(Exception):
    """The store cannot be reached or refuses us; the message says which and why (shown by /readyz)."""


def retry_storage(action: Callable[[], T], *, for_seconds: float, what: str) -> T:
    """Run `action`, retrying StorageUnavailable with exponential backoff (0.5 s doubling, at most 5 s a
    wait) for about `for_seconds`; then the last StorageUnavailable propagates."""
    deadline = time.monotonic() + for_seconds
    delay = 0.5
    while True:
        try:
            return action()
        except StorageUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: storage unavailable (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class StorageKeyInvalid(Exception):
    """A key that this service never generates (path tricks included)."""


@dataclass(frozen=True)
class SignedUrl:
    url: str  # absolute for S3; relative to the API for the local store
    expires_at: dt.datetime


def input_key(job_id: str, extension: str) -> str:
    return f"inputs/{job_id}.{extension}"


def output_key(job_id: str, index: int = 0, format: str = DEFAULT_FORMAT) -> str:
    """The clip of a job's output `index` (the first keeps the name it had before jobs had several)."""
    return f"outputs/{job_id}{_output_suffix(index)}.{AUDIO_FORMATS[format].extension}"


def spectrogram_key(job_id: str, index: int = 0) -> str:
    return f"outputs/{job_id}{_output_suffix(index)}.png"


def _output_suffix(index: int) -> str:
    return f".{index}" if index else ""


def job_id_of(key: str) -> str:
    """The job a stored object belongs to."""
    return key.split("/", 1)[1].split(".", 1)[0]


def content_type_of(key: str) -> str:
    audio = format_of_extension(key.rpartition(".")[2])
    return audio.content_type if audio else PNG


def check_key(key: str) -> str:
    if not _SAFE_KEY.match(key):
        raise StorageKeyInvalid(key)
    return key


class Storage(Protocol):
    # True when `signed_url` links to this API's /files route, which sends the bytes from `path(key)` after
    # `is_valid_signature` (a store on this machine's disk); False when links point at the store itself.
    serves_via_api: bool

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store `data`; raise StorageUnavailable if the store refuses or cannot be reached."""

    def get(self, key: str) -> bytes:
        """The stored bytes; FileNotFoundError if `key` is not there, StorageUnavailable if the store is down."""

    def list_keys(self, prefix: str) -> Iterator[tuple[str, dt.datetime]]:
        """(key, last modified) of every object under `prefix` ("inputs/" or "outputs/")."""

    def delete(self, key: str) -> None:
        """Remove `key`; a key that is already gone is fine."""

    def signed_url(self, key: str, *, not_after: dt.datetime | None = None) -> SignedUrl:
        """A time-limited download link: `url_ttl_seconds` from now, or until `not_after` if sooner (when the
        object is deleted)."""

    def check(self) -> None:
        """Raise StorageUnavailable unless reads and writes can work."""


def _expiry(ttl_seconds: int, not_after: dt.datetime | None) -> dt.datetime:
    expiry = dt.datetime.fromtimestamp(int(time.time()) + ttl_seconds, dt.UTC)
    return expiry if not_after is None else max(min(expiry, not_after), dt.datetime.now(dt.UTC))


class LocalStorage:
    """A directory shared by the API and the workers (the embedded default, one machine)."""

    serves_via_api = True

    def __init__(self, root: Path, *, signing_key: bytes, url_ttl_seconds: int):
        self.root = root
        self.signing_key = signing_key
        self.url_ttl_seconds = url_ttl_seconds

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        try:
            write_atomically(self.path(key), data)
        except OSError as exc:
            raise StorageUnavailable(f"local storage {self.root}: {exc.strerror}") from None

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def list_keys(self, prefix: str) -> Iterator[tuple[str, dt.datetime]]:
        folder = self.root / prefix
        for path in folder.iterdir() if folder.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                yield f"{prefix}{path.name}", dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageUnavailable(f"local storage {self.root}: {exc.strerror}") from None

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self.signing_key, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_url(self, key: str, *, not_after: dt.datetime | None = None) -> SignedUrl:
        expires_at = _expiry(self.url_ttl_seconds, not_after)
        expires = int(expires_at.timestamp())
        query = urlencode({"expires": expires, "signature": self._signature(check_key(key), expires)})
        return SignedUrl(f"/files/{key}?{query}", expires_at)

    def is_valid_signature(self, key: str, *, expires: int, signature: str) -> bool:
        """True if the URL was signed by us for this key and has not expired."""
        fresh = expires >= time.time()
        return fresh and hmac.compare_digest(self._signature(key, expires), signature)


class S3Storage:
    """Any S3-compatible store (SeaweedFS, AWS, R2...), path-style; URLs presigned for the public endpoint."""

    serves_via_api = False

    def __init__(
        self,
        *,
        endpoint_url: str,
        public_endpoint_url: str | None,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        url_ttl_seconds: int,
        timeout_seconds: float,
    ):
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            connect_timeout=timeout_seconds,
            read_timeout=timeout_seconds,
            retries={"max_attempts": 1, "mode": "standard"},  # no hidden retries: callers decide (retry_storage)
        )
        make_client = lambda endpoint: boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self.client = make_client(endpoint_url)
        # Presigning is offline, but the signature covers the host: sign for the host clients will call.
        self.public_client = make_client(public_endpoint_url or endpoint_url)
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.url_ttl_seconds = url_ttl_seconds

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        with self._unavailable_on_error():
            self.client.put_object(Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        with self._unavailable_on_error():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(f"no object {key} in S3 bucket {self.bucket!r}") from None

    def list_keys(self, prefix: str) -> Iterator[tuple[str, dt.datetime]]:
        with self._unavailable_on_error():
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                yield from ((item["Key"], item["LastModified"]) for item in page.get("Contents", ()))

    def delete(self, key: str) -> None:
        with self._unavailable_on_error():
            self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def check(self) -> None:
        with self._unavailable_on_error():
            self.client.head_bucket(Bucket=self.bucket)

    @contextlib.contextmanager
    def _unavailable_on_error(self):
        """Refusals (wrong key, no bucket) and network errors become StorageUnavailable naming the cause."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} at {self.endpoint_url}: {code}") from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 at {self.endpoint_url}: {exc}") from None

    def signed_url(self, key: str, *, not_after: dt.datetime | None = None) -> SignedUrl:
        expires_at = _expiry(self.url_ttl_seconds, not_after)
        lifetime = self.url_ttl_seconds if not_after is None else max(1, round(expires_at.timestamp() - time.time()))
        url = self.public_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": check_key(key), "ResponseContentType": content_type_of(key)},
            ExpiresIn=lifetime,
        )
        return SignedUrl(url, expires_at)


def open_storage(settings: Settings) -> Storage:
    """The back end the settings select: MELFUSION_STORAGE_DIR means local, otherwise S3."""
    if settings.storage_dir is not None:
        return LocalStorage(
            settings.storage_dir, signing_key=settings.url_signing_key, url_ttl_seconds=settings.url_ttl_seconds
        )
    return S3Storage(
        endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url,
        bucket=settings.s3_bucket,
        region=settings.s3_region,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        url_ttl_seconds=settings.url_ttl_seconds,
        timeout_seconds=settings.s3_timeout_seconds,
    )

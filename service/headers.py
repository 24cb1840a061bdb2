"""Protective headers on every response: a Content-Security-Policy with no inline script (the demo page's
script and style are files under /static), `nosniff`, no framing, no Referer (download URLs carry their
signature in the query string). A response that sets its own policy keeps it (the API reference pages)."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.settings import Settings


def origin_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(settings: Settings) -> str:
    """The policy of the demo page (and of every API answer): its own files, plus the store's origin for the
    clip and the spectrogram when clients download them from S3 or through MELFUSION_PUBLIC_URL."""
    elsewhere = [settings.public_url]
    if settings.storage_dir is None:
        elsewhere.append(settings.s3_public_endpoint_url or settings.s3_endpoint_url)
    media = " ".join(dict.fromkeys(["'self'", "blob:", *filter(None, map(origin_of, elsewhere))]))
    return (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src {media} data:; media-src {media}; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip


class ProtectiveHeaders:
    """ASGI middleware adding the headers to every response that lacks them."""

    def __init__(self, app: ASGIApp, *, policy: str):
        self.app = app
        self.headers = {
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
            "Referrer-Policy": "no-referrer",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)

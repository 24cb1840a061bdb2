"""ASGI middleware that refuses oversized request bodies with 413 before they are buffered.

FastAPI reads a multipart body completely before the route runs, so the route alone cannot stop a
1 GB upload. This checks Content-Length up front and counts streamed (chunked) bytes as they arrive,
answering 413 as soon as the limit is passed and dropping whatever the app tries to send after it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, field: str = "image"):
        self.app, self.max_bytes, self.field = app, max_bytes, field

    async def reject(self, scope: Scope, send: Send) -> None:
        message = f"request body larger than {self.max_bytes} bytes"
        response = error_response(413, "too_large", message, self.field, headers={"Connection": "close"})
        await response(scope, _no_body, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.reject(scope, send)

        received, rejected = 0, False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request" and not rejected:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    await self.reject(scope, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not rejected:  # after a 413 the app's complaints about the cut-off body are expected
                raise


async def _no_body() -> Message:
    return {"type": "http.disconnect"}

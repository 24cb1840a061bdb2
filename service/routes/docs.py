"""/docs and /redoc: FastAPI's API reference pages, served here so that each carries a Content-Security-Policy
admitting the CDN they load from and, by its hash, the one inline script Swagger UI's page has (everything
else the service serves allows no inline script at all)."""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

CDN = "https://cdn.jsdelivr.net"
ASSETS = f"{CDN} https://fastapi.tiangolo.com https://fonts.googleapis.com https://fonts.gstatic.com"

router = APIRouter(include_in_schema=False)


def with_policy(page: HTMLResponse) -> HTMLResponse:
    """`page` with a policy naming its own inline scripts by hash; ReDoc styles itself inline and runs its
    search in a blob: worker, Swagger UI sets styles from script."""
    inline = re.findall(rb"<script>(.*?)</script>", page.body, re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'" for script in inline)
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src {CDN} {hashes}; style-src {ASSETS} 'unsafe-inline'; font-src {ASSETS}; "
        f"img-src 'self' data: {ASSETS}; connect-src 'self'; worker-src blob:; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    return page


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return with_policy(get_swagger_ui_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} - API"))


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return with_policy(get_redoc_html(openapi_url=request.app.openapi_url, title=f"{request.app.title} - API"))

"""`/`: the demo page (plain HTML, CSS and JavaScript from `service/static/`, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["demo"])


@router.get("/", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
def demo_page() -> FileResponse:
    """A page to try the service in a browser: upload, live progress, play, spectrogram, download."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

"""`python -m service`: the API under uvicorn, host and port from MELFUSION_HOST / MELFUSION_PORT."""

import uvicorn

from jobs.settings import load_settings

from .app import create_app

settings = load_settings()
uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")

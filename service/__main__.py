"""`python -m service`: the API under uvicorn, host and port from MELFUSION_HOST / MELFUSION_PORT."""

from .app import serve

serve()

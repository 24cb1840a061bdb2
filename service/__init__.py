"""The HTTP side: a FastAPI app that validates uploads, enqueues jobs and reports on them."""

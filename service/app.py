"""`create_app(settings)`: wires Redis, the queue, storage and the bundle's limits into a FastAPI app."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis as AsyncRedis

from jobs.queue import open_queue, open_redis
from jobs.settings import Settings, load_settings
from jobs.storage import open_storage
from melfusion.limits import GenerationLimits, read_limits

from .body_limit import BodySizeLimit
from .errors import install_error_handlers
from .metrics import JobMetricsCollector
from .operations import describe_job
from .rate_limit import RateLimitHeaders, SubmitRateLimit
from .routes import demo, files, health
from .routes.jobs import build_jobs_router
from .submission import FORM_SCHEMA_NAME, JobForm
from .webhooks import WebhookSender

FORM_OVERHEAD_BYTES = 64 * 1024  # caption, numbers and multipart boundaries around the image


def create_app(settings: Settings) -> FastAPI:
    redis = open_redis(settings)
    limits = bundle_limits(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.webhook_sender.start()
        yield
        app.state.webhook_sender.stop()
        await app.state.async_redis.aclose()
        redis.close()

    app = FastAPI(
        title="MelFusion service",
        version="0.1.0",
        summary="Image + caption → music clip (MelFusion, CVPR 2024) as asynchronous jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.async_redis = AsyncRedis.from_url(settings.redis_url, socket_connect_timeout=settings.redis_timeout_seconds)
    app.state.queue = open_queue(redis, settings)
    app.state.storage = open_storage(settings)
    app.state.limits = limits
    app.state.job_form = JobForm.build(limits, settings)
    base_url = settings.public_url or f"http://{settings.host}:{settings.port}/"
    describe = lambda job: describe_job(job, redis=redis, storage=app.state.storage, base_url=base_url)
    app.state.webhook_sender = WebhookSender(
        redis=redis, settings=settings, describe=lambda job: describe(job).model_dump_json()
    )
    app.state.submit_rate_limit = SubmitRateLimit(settings)
    app.state.metrics_registry = CollectorRegistry()
    app.state.metrics_registry.register(JobMetricsCollector(
        redis, app.state.queue, app.state.storage, readiness_timeout=settings.readiness_timeout_seconds
    ))

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(RateLimitHeaders)
    install_error_handlers(app)
    document_job_form(app)
    app.include_router(build_jobs_router(limits, settings))
    app.include_router(health.router)
    app.include_router(demo.router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    if app.state.storage.serves_via_api:
        app.include_router(files.router)
    return app


def bundle_limits(settings: Settings) -> GenerationLimits:
    """The configured bundle's limits, read without torch; with none configured, the embedded tiny bundle's
    (built on first use, which imports torch: the quick start only)."""
    if settings.bundle_dir is not None:
        return read_limits(settings.bundle_dir)
    from melfusion.bundle import ensure_tiny_bundle

    return read_limits(ensure_tiny_bundle())


def document_job_form(app: FastAPI) -> None:
    """Put the POST /jobs form's schema (built from the bundle's bounds at start) into the OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            form = app.state.job_form.openapi_schema()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(form.pop("$defs", {}))
            schema["components"]["schemas"][FORM_SCHEMA_NAME] = form
        return app.openapi_schema

    app.openapi = openapi


def serve() -> None:
    """Run the API with uvicorn; every setting from MELFUSION_* (console script `melfusion-api`)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")

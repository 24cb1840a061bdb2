"""`create_app(settings)`: wires Redis, the queue, storage and the bundle's limits into a FastAPI app."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import textwrap
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis

from jobs.queue import open_queue, open_redis
from jobs.settings import Settings, load_settings
from jobs.storage import open_storage
from melfusion.errors import BundleError
from melfusion.limits import GenerationLimits, read_limits
from melfusion.manifest import default_tiny_bundle_dir

from .body_limit import BodySizeLimit
from .errors import install_error_handlers
from .events import JobEvents
from .headers import ProtectiveHeaders, content_security_policy
from .metrics import JobMetricsCollector
from .operations import describe_job
from .rate_limit import OpenStreamLimit, RateLimitHeaders, SubmitRateLimit
from .readiness import ReadinessProbe
from .routes import demo, docs, files, health, jobs
from .store_guard import GuardedStore
from .submission import FORM_SCHEMA_NAME, JobForm
from .webhooks import WebhookSender

FORM_OVERHEAD_BYTES = 64 * 1024  # caption, numbers and multipart boundaries around the image
REQUEST_THREADS = 40  # anyio's default: sync routes, dependencies and job reads run on these
ASYNC_REDIS_CONNECTIONS = 16  # the job-events subscription and short `Prefer: wait` checks


def create_app(settings: Settings) -> FastAPI:
    # Every thread that may call Redis at once gets a connection; past that a call waits, never fails.
    redis = open_redis(settings, max_connections=REQUEST_THREADS + settings.webhook_senders + 1)
    limits = bundle_limits(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = REQUEST_THREADS
        app.state.job_events.start()
        app.state.webhook_sender.start()
        yield
        app.state.webhook_sender.stop()
        app.state.guarded_store.stop()
        await app.state.job_events.stop()
        await app.state.async_redis.aclose()
        redis.close()

    app = FastAPI(
        title="MelFusion service",
        version="0.1.0",
        summary="Image + caption → music clip (MelFusion, CVPR 2024) as asynchronous jobs.",
        lifespan=lifespan,
        docs_url=None,  # served by routes/docs.py, with a policy that admits their CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.async_redis = AsyncRedis(connection_pool=AsyncBlockingConnectionPool.from_url(
        settings.redis_url, max_connections=ASYNC_REDIS_CONNECTIONS, timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
    ))  # fmt: skip
    app.state.job_events = JobEvents(app.state.async_redis)
    app.state.stream_limit = OpenStreamLimit(settings.max_streams_per_client)
    app.state.queue = open_queue(redis, settings)
    app.state.storage = open_storage(settings)
    app.state.guarded_store = GuardedStore(app.state.storage, wait_seconds=settings.store_wait_seconds,
                                           threads=REQUEST_THREADS)  # fmt: skip
    app.state.readiness_probe = ReadinessProbe(settings.readiness_timeout_seconds)
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
        redis, app.state.queue, app.state.storage, probe=app.state.readiness_probe
    ))

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(ProtectiveHeaders, policy=content_security_policy(settings))
    install_error_handlers(app)
    document_job_form(app)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(demo.router)
    app.include_router(docs.router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    if app.state.storage.serves_via_api:
        app.include_router(files.router)
    return app


def bundle_limits(settings: Settings) -> GenerationLimits:
    """The configured bundle's limits, read without torch; with none configured, the tiny bundle's. The API
    never builds weights (its image has no torch): the worker, `melfusion generate` or the embedded stack
    build the tiny bundle, so one of them starts first."""
    if settings.bundle_dir is not None:
        return read_limits(settings.bundle_dir)
    tiny = default_tiny_bundle_dir()
    if not tiny.is_dir():
        raise BundleError(f"no bundle: set MELFUSION_BUNDLE_DIR, or start a worker first (it builds the tiny "
                          f"bundle at {tiny})")  # fmt: skip
    return read_limits(tiny)


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


def serve(argv: list[str] | None = None) -> None:
    """Run the API with uvicorn; every setting from MELFUSION_* (console script `melfusion-api`)."""
    import uvicorn

    parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    proxies = trusted_proxies(settings.host)
    try:
        app = create_app(settings)
    except BundleError as exc:
        raise SystemExit(f"melfusion-api: {exc}") from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)  # fmt: skip


def trusted_proxies(host: str) -> str:
    """Whose X-Forwarded-For uvicorn believes (it names the client the per-address rate limit counts):
    FORWARDED_ALLOW_IPS if set; else loopback when the API listens on loopback only (a proxy on this
    machine), and nobody when it listens on other addresses, where a client could name itself."""
    if "FORWARDED_ALLOW_IPS" in os.environ:
        return os.environ["FORWARDED_ALLOW_IPS"]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return "127.0.0.1,::1" if loopback else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """`--help` lists every setting with its default; it needs no valid settings."""
    variables = "\n".join(
        f"  MELFUSION_{name.upper():<30} {'(secret)' if 'secret' in name else field.default!r}"
        for name, field in Settings.model_fields.items()
    )  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=textwrap.fill(
            "The MelFusion HTTP API (FastAPI under uvicorn). It is configured by environment variables (README, "
            "'Settings'); one of MELFUSION_STORAGE_DIR or MELFUSION_S3_ENDPOINT_URL is required. Behind a reverse "
            "proxy, set FORWARDED_ALLOW_IPS to its address so that its X-Forwarded-For names the client (unset: "
            "trusted from loopback when listening on loopback, from nobody otherwise).", width=100),
        epilog=f"settings and their defaults:\n{variables}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)

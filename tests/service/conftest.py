"""Session-wide real servers: redis-server, SeaweedFS (S3) and two service stacks (local store with API
keys; S3 store without). Every child process is stopped at the end of the session."""

from __future__ import annotations

import pytest
from servers import (
    ALICE,
    BOB,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_SECRET_KEY,
    SAMPLE_IMAGE,
    WEBHOOK_SECRET,
    S3Server,
    Stack,
    launch_stack,
    start_seaweedfs,
)

from embedded.processes import free_port, start_redis


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def redis_port(workdir):
    port = free_port()
    server = start_redis(port=port, data_dir=workdir / "redis")
    yield port
    server.stop()


@pytest.fixture(scope="session")
def s3_server(workdir) -> S3Server:
    server = start_seaweedfs(workdir / "seaweedfs")
    yield server
    server.process.stop()


@pytest.fixture(scope="session")
def local_stack(workdir, redis_port, tiny_bundle) -> Stack:
    stack = launch_stack("local", workdir=workdir, redis_port=redis_port, db=1, bundle=tiny_bundle,
                         storage_dir=workdir / "local-storage", api_keys=f"{ALICE},{BOB}",
                         webhook_secret=WEBHOOK_SECRET)  # fmt: skip
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def s3_stack(workdir, redis_port, tiny_bundle, s3_server) -> Stack:
    stack = launch_stack(
        "s3",
        workdir=workdir,
        redis_port=redis_port,
        db=2,
        bundle=tiny_bundle,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_public_endpoint_url=s3_server.endpoint_url.replace("127.0.0.1", "localhost"),
        s3_bucket=S3_BUCKET,
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def live_stack(workdir, redis_port, tiny_bundle) -> Stack:
    """No API keys, webhooks on (loopback targets allowed, fast retries), `Prefer: wait` up to 5 s."""
    stack = launch_stack("live", workdir=workdir, redis_port=redis_port, db=10, bundle=tiny_bundle,
                         storage_dir=workdir / "live-storage", webhook_secret=WEBHOOK_SECRET,
                         webhook_allow_private="true", webhook_timeout_seconds=1, webhook_backoff_seconds=0.2,
                         webhook_retry_seconds=3, prefer_wait_max_seconds=5)  # fmt: skip
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def sample_png() -> bytes:
    return SAMPLE_IMAGE.read_bytes()

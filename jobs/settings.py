"""One settings class for the API and the workers, read from `MELFUSION_*` environment variables."""

from __future__ import annotations

import base64
import binascii
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from melfusion.errors import InputError
from melfusion.limits import check_device


class Settings(BaseSettings):
    """Validated once at start-up: a bad value stops the process with a message naming the variable."""

    model_config = SettingsConfigDict(env_prefix="MELFUSION_", extra="ignore")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    public_url: str | None = None  # how clients reach the API, for absolute file URLs; else URLs are relative
    api_keys: Annotated[list[str], NoDecode] = []  # comma-separated; empty = no auth, one shared namespace

    # Queue
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = "melfusion"
    job_ttl_seconds: int = Field(86_400, gt=0)  # how long finished jobs and idempotency keys are kept
    job_timeout_seconds: int = Field(3_600, gt=0)  # longer than any job; compose's stop_grace_period matches it
    heartbeat_seconds: float = Field(5.0, gt=0)  # a worker is "fresh" if it beat within 3 intervals
    # Every Redis and S3 call gives up after this long, so a hung backend costs a request seconds, not minutes.
    redis_timeout_seconds: float = Field(2.0, gt=0)
    s3_timeout_seconds: float = Field(3.0, gt=0)
    readiness_timeout_seconds: float = Field(0.9, gt=0)  # /readyz answers within a second, a hung check says so
    # A request waits this long for the store to take a photo, then answers 503 (the photo is deleted once
    # the abandoned upload ends). 10 MB in 1.5 s needs about 55 Mbit/s to the store: raise it for a far one.
    store_wait_seconds: float = Field(1.5, gt=0)
    # Overload and abuse: POST /jobs answers 503 + Retry-After past this many queued jobs, and 429 +
    # Retry-After past the per-API-key rate (`limits` notation, e.g. "10/second;300/minute"; empty = off).
    max_queue_depth: int = Field(1000, ge=1)
    rate_limit: str = "10/second;300/minute"
    # Event streams and `Prefer: wait` requests one API key (or client address) may hold open on one API
    # process at once; more get 429. They cost no Redis connection or thread while they wait.
    max_streams_per_client: int = Field(100, ge=1)
    # Storage blips: a worker retries a failing store this long (backoff up to 5 s), then fails the job with
    # storage_unavailable; it takes no new job while the store is down, so queued jobs wait.
    storage_retry_seconds: float = Field(30.0, ge=0)
    # Uploaded photos whose job is gone, and WAVs whose job record expired (job_ttl_seconds), are deleted by
    # one worker every sweep interval; objects younger than the grace are left alone (a POST in flight).
    sweep_interval_seconds: float = Field(300.0, gt=0)
    sweep_grace_seconds: float = Field(120.0, ge=0)
    # A job whose worker died (SIGKILL, OOM, lost node) is retried, or failed with error worker_lost, within
    # this bound: workers refresh their jobs' started-registry entries every heartbeat and every worker's
    # janitor reclaims expired ones (RQ's cleanup: Retry, FailedJobRegistry, AbandonedJobError).
    abandoned_after_seconds: float = Field(120.0, ge=4)
    max_retries: int = Field(1, ge=0)  # retries of a job whose worker was lost (never of a job that failed)
    # SIGTERM: the current batch gets this long to finish, then goes back to the queue (as on a second SIGTERM).
    shutdown_grace_seconds: float = Field(600.0, gt=0)

    # Model
    bundle_dir: Path | None = None  # None = the embedded tiny bundle (built on first use; imports torch)
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    torch_threads: int | None = Field(None, gt=0)  # unset: OMP_NUM_THREADS, else the cores the worker may use
    # torch.compile of the UNets; "check" traces with dynamo but runs eagerly and makes any graph compiled
    # after warm-up an error: on a CPU it proves that traffic stays on the warmed graphs.
    compile_mode: Literal["off", "default", "reduce-overhead", "max-autotune", "check"] = "off"
    # The image UNet's backend: "same" as the music UNet, or "cudagraphs" (CUDA graphs over eager kernels:
    # captured in seconds where inductor compiles for minutes, slower per step).
    image_compile_backend: Literal["same", "cudagraphs"] = "same"
    # Shapes the worker runs once before it takes jobs, so no job pays for compilation or first-call
    # allocation; empty = no warm-up (an eager CPU worker has nothing to warm). A compiled worker pads every
    # call to them (melfusion/shapes.py): batches to these sizes, clips to these lengths (cut from the
    # bucket's latent), captions to these token counts.
    warmup_batch_sizes: Annotated[list[int], NoDecode] = []
    warmup_seconds: Annotated[list[float], NoDecode] = []
    warmup_caption_tokens: Annotated[list[int], NoDecode] = [32, 128]
    # Dynamic batching: up to max_batch queued jobs with the same seconds, steps, sampler, image guidance
    # and CFG share one pipeline call; a GPU step costs about the same at batch 2 and 8 (issue 8's table).
    max_batch: int = Field(8, ge=1)
    batch_wait_ms: float = Field(20.0, ge=0)  # longest wait for partners; the oldest job never waits longer
    # Image features of recent photos, kept per worker (full size: ~0.3 GB per photo at 100 steps, fp32);
    # a repeated photo then skips DDIM inversion and re-denoising. 0 turns the cache off.
    feature_cache_mb: int = Field(1024, ge=0)

    # Results without polling
    prefer_wait_max_seconds: float = Field(60.0, ge=0)  # cap of `Prefer: wait=N` on POST /jobs
    # Webhooks, signed per Standard Webhooks with this secret (`whsec_` + base64); unset = webhooks refused
    webhook_secret: SecretStr | None = None
    webhook_allow_private: bool = False  # allow loopback/private/link-local targets (tests, one-machine setups)
    webhook_timeout_seconds: float = Field(5.0, gt=0)  # one attempt; a hanging target costs a sender thread this long
    webhook_retry_seconds: float = Field(600.0, ge=0)  # no new attempt this long after the first one
    webhook_backoff_seconds: float = Field(1.0, gt=0)  # first retry delay, doubled each retry (capped at 60 s)
    webhook_senders: int = Field(8, ge=1)  # concurrent deliveries per API process

    # Request limits (the bundle adds seconds/steps ranges)
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_caption_chars: int = Field(1000, gt=0)

    # Storage: MELFUSION_STORAGE_DIR selects the local back end, otherwise S3
    storage_dir: Path | None = None
    signing_secret: SecretStr | None = None  # HMAC key of local file URLs; random per process if unset
    url_ttl_seconds: int = Field(3_600, gt=0)
    s3_endpoint_url: str | None = None  # as the API and workers reach it (e.g. http://seaweedfs:8333)
    s3_public_endpoint_url: str | None = None  # as clients reach it; presigned URLs are signed for this host
    s3_bucket: str = "melfusion"
    s3_region: str = "us-east-1"
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None

    @field_validator("api_keys", "warmup_batch_sizes", "warmup_seconds", "warmup_caption_tokens", mode="before")
    @classmethod
    def split_commas(cls, value):
        return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value

    @field_validator("webhook_secret")
    @classmethod
    def check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            encoded = text.removeprefix("whsec_").rstrip("=")
            try:
                key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            except binascii.Error:
                key = b""
            if not text.startswith("whsec_") or len(key) < 16:
                raise ValueError("expected whsec_ followed by at least 16 bytes in base64 (Standard Webhooks)")
        return value

    @field_validator("rate_limit")
    @classmethod
    def parse_rate_limit(cls, value: str) -> str:
        from limits import parse_many

        if value.strip():
            parse_many(value)  # raises ValueError naming the bad part
        return value

    @property
    def started_ttl_seconds(self) -> int:
        """How long a running job's started-registry entry lives without a heartbeat: half the bound, so
        expiry + the janitor's interval (a quarter) + one heartbeat stay within `abandoned_after_seconds`."""
        return max(2, int(self.abandoned_after_seconds / 2))

    @property
    def janitor_interval_seconds(self) -> float:
        return self.abandoned_after_seconds / 4

    @model_validator(mode="after")
    def check_device(self) -> Settings:
        try:
            check_device(self.device, self.dtype)
        except InputError as exc:
            raise ValueError(f"MELFUSION_{exc.field.upper()}: {exc.message}") from None
        return self

    @model_validator(mode="after")
    def warm_every_compiled_shape(self) -> Settings:
        """A compiled worker serves only warmed shapes, so it needs them all, and no batch above them."""
        if self.compile_mode == "off":
            return self
        if not (self.warmup_batch_sizes and self.warmup_seconds and self.warmup_caption_tokens):
            raise ValueError(
                f"MELFUSION_COMPILE_MODE={self.compile_mode} needs MELFUSION_WARMUP_BATCH_SIZES and "
                "MELFUSION_WARMUP_SECONDS (and MELFUSION_WARMUP_CAPTION_TOKENS): "
                "the shapes it compiles before taking jobs"
            )
        if self.max_batch > max(self.warmup_batch_sizes):
            raise ValueError(
                f"MELFUSION_MAX_BATCH={self.max_batch} exceeds the largest warmed batch "
                f"({max(self.warmup_batch_sizes)} in MELFUSION_WARMUP_BATCH_SIZES)"
            )
        return self

    @model_validator(mode="after")
    def require_one_storage(self) -> Settings:
        if self.storage_dir is None and not self.s3_endpoint_url:
            raise ValueError("set MELFUSION_STORAGE_DIR (local files) or MELFUSION_S3_ENDPOINT_URL (S3 storage)")
        if self.storage_dir is None and not (self.s3_access_key and self.s3_secret_key):
            raise ValueError("S3 storage needs MELFUSION_S3_ACCESS_KEY and MELFUSION_S3_SECRET_KEY")
        return self

    @cached_property
    def url_signing_key(self) -> bytes:
        secret = self.signing_secret.get_secret_value() if self.signing_secret else secrets.token_hex(32)
        return secret.encode()

def load_settings(**overrides) -> Settings:
    """Settings from the environment (overrides win), or exit with one line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [_describe_problem(error) for error in exc.errors()]
        raise SystemExit("invalid settings:\n" + "\n".join(problems)) from None


def _describe_problem(error: dict) -> str:
    """`  MELFUSION_PORT: Input should be ...`, or just the message for checks across several variables."""
    variable = "_".join(map(str, error["loc"])).upper()
    return f"  MELFUSION_{variable}: {error['msg']}" if variable else f"  {error['msg'].removeprefix('Value error, ')}"

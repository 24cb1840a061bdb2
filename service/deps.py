"""Request dependencies as Annotated aliases: routes declare what they need by type.

Those that only look something up are `async`, so FastAPI resolves them on the event loop: a sync one
takes a request thread, and /readyz must answer while every request thread waits on a hung backend."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from jobs.settings import Settings
from jobs.storage import Storage

from .errors import Unauthorized
from .events import JobEvents
from .rate_limit import OpenStreamLimit, SubmitRateLimit
from .readiness import ReadinessProbe
from .store_guard import GuardedStore

PUBLIC_OWNER = "public"
_bearer = HTTPBearer(auto_error=False, description="an API key, if the server sets MELFUSION_API_KEYS")


def from_app_state(name: str):
    """A dependency giving `app.state.<name>`: the process-wide object create_app put there."""

    async def dependency(request: Request):
        return getattr(request.app.state, name)

    dependency.__name__ = f"get_{name}"
    return Depends(dependency)


SettingsDep = Annotated[Settings, from_app_state("settings")]
RedisDep = Annotated[Redis, from_app_state("redis")]
AsyncRedisDep = Annotated[AsyncRedis, from_app_state("async_redis")]
JobEventsDep = Annotated[JobEvents, from_app_state("job_events")]
StreamLimitDep = Annotated[OpenStreamLimit, from_app_state("stream_limit")]
GuardedStoreDep = Annotated[GuardedStore, from_app_state("guarded_store")]
ReadinessProbeDep = Annotated[ReadinessProbe, from_app_state("readiness_probe")]
QueueDep = Annotated[Queue, from_app_state("queue")]
StorageDep = Annotated[Storage, from_app_state("storage")]


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _is_known_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> bool:
    token = credentials.credentials if credentials else ""
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys)


async def get_owner(settings: SettingsDep, credentials: CredentialsDep) -> str:
    """Whose jobs this request may see: a digest of its API key, or one shared owner when keys are off."""
    if not settings.api_keys:
        return PUBLIC_OWNER
    if not _is_known_key(settings, credentials):
        raise Unauthorized("missing or unknown API key (Authorization: Bearer <key>)", field="Authorization")
    return hashlib.sha256(credentials.credentials.encode()).hexdigest()[:24]


async def get_is_operator(settings: SettingsDep, credentials: CredentialsDep) -> bool:
    """Whether the caller may see internal details (backend endpoints): it presents a configured API key.
    Without API keys nobody is identified, so nobody sees them; the API log has them."""
    return _is_known_key(settings, credentials)


async def get_base_url(settings: SettingsDep) -> str:
    """Prefix of links to local files: the configured public URL, or "" for links relative to this API
    (never the request's Host header, which a client chooses)."""
    return settings.public_url or ""


OwnerDep = Annotated[str, Depends(get_owner)]
IsOperatorDep = Annotated[bool, Depends(get_is_operator)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]


@dataclass(frozen=True)
class Caller:
    """Who the per-caller limits count: an API key, or, with keys off, a client address."""

    key: str
    described_as: str  # in error messages: "this API key", "address 203.0.113.5"


async def get_caller(request: Request, owner: OwnerDep) -> Caller:
    """The API key, or with keys off the client address (an IPv6 client: its /64). Behind a proxy the address
    is the one uvicorn reads from X-Forwarded-For when the proxy is in FORWARDED_ALLOW_IPS."""
    if owner != PUBLIC_OWNER:
        return Caller(owner, "this API key")
    client = client_network(request.client.host if request.client else "unknown")
    return Caller(f"address:{client}", f"address {client}")


CallerDep = Annotated[Caller, Depends(get_caller)]


def enforce_rate_limit(request: Request, caller: CallerDep) -> None:
    """429 + Retry-After once the caller has submitted too much (see SubmitRateLimit), so one busy client
    cannot spend everyone's budget; and the IETF draft's `RateLimit-Policy` and `RateLimit` headers on every
    answer that counted (put there by RateLimitHeaders, whatever the answer)."""
    limit: SubmitRateLimit = request.app.state.submit_rate_limit
    budget = limit.hit(caller.key)
    request.state.rate_limit_headers = budget.headers()
    budget.raise_if_exhausted(described_as=caller.described_as)


def client_network(host: str) -> str:
    """What one client is for rate limiting: an IPv4 address, or an IPv6 /64 (one subscriber's usual
    allocation, whose 2^64 addresses would otherwise each get a budget)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(ipaddress.ip_network(f"{address}/64", strict=False)) if address.version == 6 else str(address)

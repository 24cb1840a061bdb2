"""Request dependencies as Annotated aliases: routes declare what they need by type."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from jobs.settings import Settings
from jobs.storage import Storage

from .errors import Unauthorized
from .rate_limit import SubmitRateLimit

PUBLIC_OWNER = "public"
_bearer = HTTPBearer(auto_error=False, description="an API key, if the server sets MELFUSION_API_KEYS")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_async_redis(request: Request) -> AsyncRedis:
    return request.app.state.async_redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[AsyncRedis, Depends(get_async_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StorageDep = Annotated[Storage, Depends(get_storage)]


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _is_known_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> bool:
    token = credentials.credentials if credentials else ""
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys)


def get_owner(settings: SettingsDep, credentials: CredentialsDep) -> str:
    """Whose jobs this request may see: a digest of its API key, or one shared owner when keys are off."""
    if not settings.api_keys:
        return PUBLIC_OWNER
    if not _is_known_key(settings, credentials):
        raise Unauthorized("missing or unknown API key (Authorization: Bearer <key>)", field="Authorization")
    return hashlib.sha256(credentials.credentials.encode()).hexdigest()[:24]


def get_is_operator(settings: SettingsDep, credentials: CredentialsDep) -> bool:
    """Whether the caller may see internal details (backend endpoints): it presents a configured API key.
    Without API keys nobody is identified, so nobody sees them; the API log has them."""
    return _is_known_key(settings, credentials)


def get_base_url(settings: SettingsDep) -> str:
    """Prefix of links to local files: the configured public URL, or "" for links relative to this API
    (never the request's Host header, which a client chooses)."""
    return settings.public_url or ""


OwnerDep = Annotated[str, Depends(get_owner)]
IsOperatorDep = Annotated[bool, Depends(get_is_operator)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]


def enforce_rate_limit(request: Request, owner: OwnerDep) -> None:
    """429 + Retry-After once the caller has submitted too much (see SubmitRateLimit), and the IETF draft's
    `RateLimit-Policy` and `RateLimit` headers on every answer that counted: counted per API key,
    or, with keys off, per client address, so one busy client cannot spend everyone's budget. Behind a
    proxy the address is the one uvicorn reads from X-Forwarded-For when the proxy is in FORWARDED_ALLOW_IPS."""
    limit: SubmitRateLimit = request.app.state.submit_rate_limit
    if owner != PUBLIC_OWNER:
        caller, described_as = owner, "this API key"
    else:
        client = client_network(request.client.host if request.client else "unknown")
        caller, described_as = f"address:{client}", f"address {client}"
    budget = limit.hit(caller)
    request.state.rate_limit_headers = budget.headers()  # on the answer, whatever it is (RateLimitHeaders)
    budget.raise_if_exhausted(described_as=described_as)


def client_network(host: str) -> str:
    """What one client is for rate limiting: an IPv4 address, or an IPv6 /64 (one subscriber's usual
    allocation, whose 2^64 addresses would otherwise each get a budget)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(ipaddress.ip_network(f"{address}/64", strict=False)) if address.version == 6 else str(address)

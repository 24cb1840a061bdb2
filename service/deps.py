"""Request dependencies as Annotated aliases: routes declare what they need by type."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue

from jobs.settings import Settings
from jobs.storage import Storage
from melfusion.limits import GenerationLimits

from .errors import Unauthorized

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


def get_limits(request: Request) -> GenerationLimits:
    return request.app.state.limits


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[AsyncRedis, Depends(get_async_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StorageDep = Annotated[Storage, Depends(get_storage)]
LimitsDep = Annotated[GenerationLimits, Depends(get_limits)]


def get_owner(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Whose jobs this request may see: a digest of its API key, or one shared owner when keys are off."""
    if not settings.api_keys:
        return PUBLIC_OWNER
    token = credentials.credentials if credentials else ""
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys):
        raise Unauthorized("missing or unknown API key (Authorization: Bearer <key>)", field="Authorization")
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def get_base_url(request: Request, settings: SettingsDep) -> str:
    """Where clients reach this API, for absolute links to local files."""
    return settings.public_url or str(request.base_url)


OwnerDep = Annotated[str, Depends(get_owner)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]

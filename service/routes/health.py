"""/livez, /readyz, /metrics: what an orchestrator and Prometheus ask."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import RedisDep, SettingsDep, StorageDep
from ..readiness import check_readiness
from ..schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process answers; says nothing about Redis, storage or workers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(redis: RedisDep, storage: StorageDep, settings: SettingsDep) -> JSONResponse:
    """Redis reachable, storage reachable, a worker heartbeat on our queue fresh; each check says why not."""
    readiness = check_readiness(redis=redis, storage=storage, queue_name=settings.queue_name)
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)

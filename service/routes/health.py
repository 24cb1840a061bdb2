"""/livez, /readyz, /metrics: what an orchestrator and Prometheus ask."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import IsOperatorDep, ReadinessProbeDep, RedisDep, SettingsDep, StorageDep
from ..readiness import check_readiness
from ..schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The process answers; touches no backend and no request thread (async), so a hung backend that
    ties up request threads cannot make an orchestrator restart a healthy API."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(
    redis: RedisDep, storage: StorageDep, settings: SettingsDep, probe: ReadinessProbeDep, is_operator: IsOperatorDep
) -> JSONResponse:
    """200 when Redis and storage answer (jobs can be taken, polled, downloaded), else 503; each check says
    why not (endpoint details only to a caller with an API key). Workers are reported, not required:
    `workers_available` counts the warmed-up ones. Answers within `readiness_timeout_seconds`."""
    readiness = await check_readiness(
        redis=redis, storage=storage, queue_name=settings.queue_name, probe=probe, show_internal=is_operator,
    )  # fmt: skip
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)

"""Domain errors of the service and the one place that turns them (and everything else) into JSON.

Every error response is `{"error": {"code", "message", "field"}}`; nothing carries a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs.storage import StorageUnavailable
from melfusion.errors import InputError

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error with its HTTP status; subclasses fix the status and code."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message, self.field, self.retry_after = message, field, retry_after


class PayloadTooLarge(ApiError):
    status_code, code = 413, "too_large"


class UnsupportedMediaType(ApiError):
    status_code, code = 415, "unsupported_media_type"


class IdempotencyConflict(ApiError):
    status_code, code = 422, "idempotency_key_reused"


class TargetRefused(ApiError):
    status_code, code = 422, "invalid_parameter"


class Unauthorized(ApiError):
    status_code, code = 401, "unauthorized"


class JobNotFound(ApiError):
    status_code, code = 404, "not_found"


class JobStateConflict(ApiError):
    status_code, code = 409, "conflict"


class LinkInvalid(ApiError):
    status_code, code = 403, "link_invalid"


class RateLimited(ApiError):
    status_code, code = 429, "rate_limited"


class Overloaded(ApiError):
    status_code, code = 503, "overloaded"


BACKEND_RETRY_AFTER_SECONDS = 5  # what a 503 for an unreachable Redis or store tells clients to wait


def error_response(status_code: int, code: str, message: str, field: str | None = None, **kwargs) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status_code, **kwargs)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    def handle_api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return error_response(exc.status_code, exc.code, exc.message, exc.field, headers=headers)

    @app.exception_handler(InputError)
    def handle_input_error(request: Request, exc: InputError) -> JSONResponse:
        return error_response(422, "invalid_parameter", exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    def handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = next((part for part in reversed(first["loc"]) if isinstance(part, str)), None)
        return error_response(422, "invalid_parameter", first["msg"], field)

    @app.exception_handler(StarletteHTTPException)
    def handle_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, "http_error", str(exc.detail), headers=exc.headers)

    @app.exception_handler(StorageUnavailable)
    @app.exception_handler(RedisError)
    def handle_backend_down(request: Request, exc: Exception) -> JSONResponse:
        log.error("backend unavailable on %s: %s", request.url.path, exc)
        headers = {"Retry-After": str(BACKEND_RETRY_AFTER_SECONDS)}
        return error_response(503, "unavailable", "a backend service is unavailable; retry later", headers=headers)

    @app.exception_handler(Exception)
    def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "internal error")

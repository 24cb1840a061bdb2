"""POST /jobs's multipart form, derived from `GenerationRequest`'s declaration plus the job's own options.

`JobForm.build` turns the declared fields (with the loaded bundle's bounds and the settings' text cap) into
a pydantic model that forbids other fields; the same model is the form's OpenAPI schema (`openapi_schema`),
and `read_submission`, a dependency, parses a request's form strictly through it. So a field added to
`GenerationRequest` reaches the form, its validation and its documentation with no change here.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jobs.settings import Settings
from jobs.webhooks import DEFAULT_EVENTS as DEFAULT_WEBHOOK_EVENTS
from jobs.webhooks import EVENTS as WEBHOOK_EVENTS
from melfusion.limits import GenerationLimits
from melfusion.request import OFF, GenerationRequest

from .errors import UnsupportedMediaType
from .forms import FormFieldInvalid, parse_strict_form
from .schemas import WebhookSubscription
from .uploads import ImageType, read_image_upload

FORM_SCHEMA_NAME = "JobCreate"
IMAGE_FIELD = "image"
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")  # Go-style, as Replicate's Cancel-After: 90s, 1m30s, 1.5h
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
CANCEL_AFTER_DOC = (
    "a deadline, as a duration (`30s`, `5m`, `1h30m`, or plain seconds): a job not started by then ends "
    "`aborted` without running; a running one is canceled at the deadline"
)


def parse_cancel_after(value: str | None) -> float | None:
    """Seconds from now of a `Cancel-After` header (Replicate's deadline semantics); None without one.

    Raises:
        FormFieldInvalid: not a positive duration (names the header).
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = DURATION.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            seconds = float("nan")
        else:
            seconds = sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)
    if not seconds > 0 or seconds == float("inf"):
        message = f"must be a positive duration such as 30s, 5m or 1h30m, got {value!r}"
        raise FormFieldInvalid(message, field="Cancel-After")
    return seconds


def job_options(settings: Settings) -> dict[str, Any]:
    """The form's fields that belong to the job rather than to the generation (pydantic field definitions)."""
    return {
        "expires_in": (int | None, Field(
            None, ge=1, le=settings.job_ttl_seconds, description="seconds the job and its files are kept once it "
            f"ends (echoed as `expires_at`); default {settings.job_ttl_seconds}, the most MELFUSION_JOB_TTL_SECONDS",
        )),
        "webhook_url": (str | None, Field(
            None, max_length=2048, description="POST the job JSON here, signed per Standard Webhooks "
            "(`webhook-id`, `webhook-timestamp`, `webhook-signature`); public http(s) addresses only",
        )),
        "webhook_events": (list[Literal[WEBHOOK_EVENTS]] | None, Field(  # type: ignore[valid-type]
            None, description="repeat the field to choose several; progress is sent at most twice a second; "
            f"default {', '.join(DEFAULT_WEBHOOK_EVENTS)}",
        )),
    }  # fmt: skip


@dataclass(frozen=True)
class Submission:
    """A parsed POST /jobs form: the generation request, the photo if any, and the job's options."""

    request: GenerationRequest  # as given (unset fields None): what an idempotent retry must repeat
    params: GenerationRequest  # resolved against the bundle: what the worker runs
    image: bytes | None
    image_type: ImageType | None
    webhook: WebhookSubscription | None
    expires_in: int | None  # None: the settings' job_ttl_seconds


@dataclass(frozen=True)
class JobForm:
    """The form model of one app (its bundle's bounds, its settings' caps)."""

    model: type[BaseModel]
    limits: GenerationLimits
    max_upload_bytes: int
    image_description: str

    @classmethod
    def build(cls, limits: GenerationLimits, settings: Settings) -> JobForm:
        definitions = {}
        for described in GenerationRequest.interface(limits):
            kind = Literal[described.choices] if described.choices else described.kind  # type: ignore[valid-type]
            promises = {"ge": described.ge, "gt": described.gt, "lt": described.lt, "le": described.le}
            if described.text:
                promises |= {"min_length": 1, "max_length": settings.max_caption_chars}
            promises = {name: value for name, value in promises.items() if value is not None}
            if described.nullable:  # the bounds hold for the value; OFF is the form's spelling of null
                kind, promises = Annotated[kind, Field(**promises)] | Literal[OFF], {}
            field_info = Field(described.default, description=described.help, **promises)
            definitions[described.name] = (kind | None, field_info)
        definitions |= job_options(settings)
        model = create_model(FORM_SCHEMA_NAME, __config__=ConfigDict(extra="forbid"), **definitions)
        description = (
            f"JPEG, PNG or WebP, ≤ {settings.max_upload_bytes} bytes, ≤ {settings.max_image_pixels} pixels; "
            "optional when a caption is given"
        )
        return cls(model, limits, settings.max_upload_bytes, description)

    @property
    def repeatable(self) -> frozenset[str]:
        """Fields declared as lists: one part per value (e.g. `webhook_events`)."""
        return frozenset(
            name for name, info in self.model.model_fields.items()
            if any(typing.get_origin(kind) is list for kind in typing.get_args(info.annotation))
        )  # fmt: skip

    def openapi_schema(self) -> dict[str, Any]:
        """The form's JSON schema, with the photo as a binary part (OpenAPI's multipart convention)."""
        schema = self.model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["properties"] = {
            IMAGE_FIELD: {"type": "string", "format": "binary", "description": self.image_description},
            **schema["properties"],
        }
        schema.pop("additionalProperties", None)  # stated again below, after the photo joined the fields
        schema["additionalProperties"] = False
        return schema

    def validate(self, form) -> dict[str, Any]:
        """The form's text fields, validated; 422 naming every unknown field, or the first bad one. An empty
        value counts as not given (as browsers send untouched inputs)."""
        unknown = sorted(set(form) - set(self.model.model_fields) - {IMAGE_FIELD})
        if unknown:
            known = ", ".join((IMAGE_FIELD, *self.model.model_fields))
            raise FormFieldInvalid(f"unknown form fields {', '.join(unknown)}; the form has {known}", field=unknown[0])
        values = {}
        for name in self.model.model_fields:
            given = [value for value in form.getlist(name) if value != ""]
            if given:
                values[name] = given if name in self.repeatable else given[0]
        try:
            return self.model.model_validate(values).model_dump(exclude_unset=True)
        except ValidationError as exc:
            # named by the form field alone: a union's branch ("constrained-float") is no field of the form
            raise RequestValidationError([{**error, "loc": ("body", error["loc"][0])} for error in exc.errors()])


async def read_submission(request: Request) -> Submission:
    """POST /jobs's form, parsed strictly (see `service.forms`), validated against the declared fields and
    resolved against the bundle: every refusal of a field is a 4xx naming it, before anything is stored.

    Raises:
        InputError: a field out of range, or neither a caption nor an image (a 422 naming the field).
    """
    job_form: JobForm = request.app.state.job_form
    form = await parse_strict_form(request, request.app.state.settings, repeatable=job_form.repeatable)
    try:
        values = job_form.validate(form)
        upload = form.get(IMAGE_FIELD)
        image, image_type = None, None
        if isinstance(upload, UploadFile) and (upload.filename or upload.size):  # a browser's empty file input: none
            image, image_type = await run_in_threadpool(read_image_upload, upload, max_bytes=job_form.max_upload_bytes)
        elif upload is not None:
            raise UnsupportedMediaType("image must be a file part, not text", field=IMAGE_FIELD)
    finally:
        await form.close()
    webhook_url, events = values.pop("webhook_url", None), values.pop("webhook_events", None)
    expires_in = values.pop("expires_in", None)
    webhook = None
    if webhook_url is not None:
        webhook = WebhookSubscription(url=webhook_url, events=events or list(DEFAULT_WEBHOOK_EVENTS))
    request = GenerationRequest(**{name: None if value == OFF else value for name, value in values.items()})  # OFF: null
    params = request.resolved(job_form.limits)
    params.check_condition(has_image=image is not None)
    return Submission(request, params, image, image_type, webhook, expires_in)


SubmissionDep = Annotated[Submission, Depends(read_submission)]

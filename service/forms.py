"""Strict multipart parsing for routes that take forms: every text field is UTF-8 and within its size,
every field comes once, and each refusal names the field (Starlette alone decodes bad UTF-8 as latin-1,
refuses a 1 MB field with an anonymous 400 and keeps only the first of two `image` parts)."""

from __future__ import annotations

import typing

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from jobs.settings import Settings

from .errors import ApiError

TEXT_FIELD_BYTES_PER_CHAR = 4  # the most a UTF-8 character takes


class FormFieldTooLarge(ApiError, MultiPartException):  # a MultiPartException, so the parser closes its files
    status_code, code = 413, "too_large"


class FormFieldInvalid(ApiError, MultiPartException):
    status_code, code = 422, "invalid_parameter"


class StrictMultiPartParser(MultiPartParser):
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            raise FormFieldTooLarge(f"{part.field_name} larger than {self.max_part_size} bytes", field=part.field_name)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise FormFieldInvalid(f"{part.field_name} is not valid UTF-8", field=part.field_name) from None
        super().on_part_end()


async def parse_strict_form(request: Request, settings: Settings, *, repeatable: frozenset[str] = frozenset()) -> FormData:
    """The request's multipart form, parsed strictly (see the module docstring); only the `repeatable`
    fields (declared as lists) may come more than once."""
    max_part_size = max(1024, TEXT_FIELD_BYTES_PER_CHAR * settings.max_caption_chars)
    parser = StrictMultiPartParser(request.headers, request.stream(), max_part_size=max_part_size)
    try:
        form = await parser.parse()
    except ApiError:
        raise
    except MultiPartException as exc:  # no boundary, a broken part header...
        raise FormFieldInvalid(f"unreadable multipart body: {exc.message}") from None
    for name in form:
        if name not in repeatable and len(form.getlist(name)) > 1:
            await form.close()
            raise FormFieldInvalid(f"send one {name} part, not {len(form.getlist(name))}", field=name)
    return form


def list_fields(route: APIRoute) -> frozenset[str]:
    """The route's form fields declared as lists (one part per value, e.g. `webhook_events`)."""
    names = set()
    for param in route.dependant.body_params:
        annotation = param.field_info.annotation
        if any(typing.get_origin(kind) is list for kind in (annotation, *typing.get_args(annotation))):
            names.add(param.alias)
    return frozenset(names)


class StrictFormRoute(APIRoute):
    """An APIRoute whose multipart bodies go through `parse_strict_form` before FastAPI reads them."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        repeatable = list_fields(self)

        async def strict_handler(request: Request):
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                # FastAPI then reads the same parsed form: Request caches it in `_form`.
                request._form = await parse_strict_form(request, request.app.state.settings, repeatable=repeatable)
            return await handler(request)

        return strict_handler

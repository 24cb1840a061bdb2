"""Strict multipart parsing for routes that take forms: every text field is UTF-8 and within its size,
every field comes once, and each refusal names the field (Starlette alone decodes bad UTF-8 as latin-1,
refuses a 1 MB field with an anonymous 400 and keeps only the first of two `image` parts)."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from jobs.settings import Settings

from .errors import ApiError, UnsupportedMediaType

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


async def parse_strict_form(
    request: Request, settings: Settings, *, repeatable: frozenset[str] = frozenset()
) -> FormData:
    """The request's multipart form, parsed strictly (see the module docstring); only the `repeatable`
    fields (declared as lists) may come more than once."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaType("send the form as multipart/form-data", field="Content-Type")
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

"""A small typed client for the MelFusion service: `submit`, `wait` (with progress), `download`.

    client = MelFusionClient("http://127.0.0.1:8000", api_key=None)
    job = client.submit("photo.jpg", "calm piano at sunset", seconds=10)
    job = client.wait(job.id, on_progress=lambda j: print(f"{j.status} {j.progress:.0%}"))  # live events
    client.download(job, "clip.wav")  # checks the sha256 the service reported

The generation's fields are `melfusion.request.GenerationRequest`'s, checked by name and type before
anything is sent: `submit(caption=..., seconds=..., num_outputs=...)` or `submit(request=GenerationRequest(...))`.
Depends on httpx and the torch-free `melfusion.request`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from dataclasses import fields as dataclass_fields
from typing import Any, Self

import httpx

from melfusion.request import OFF, GenerationRequest

TERMINAL = ("succeeded", "failed", "canceled", "aborted")


class ServiceError(Exception):
    """An error response: HTTP status, machine-readable code, the offending field and a message."""

    def __init__(self, status_code: int, code: str, message: str, field: str | None):
        super().__init__(f"{status_code} {code}" + (f" ({field})" if field else "") + f": {message}")
        self.status_code, self.code, self.message, self.field = status_code, code, message, field


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    progress: float
    queue_position: int | None
    params: dict[str, Any]
    result: dict[str, Any] | None  # the first of `outputs`
    error: dict[str, str] | None
    outputs: list[dict[str, Any]]  # one per `num_outputs`, in seed order
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        names = ("id", "status", "progress", "queue_position", "params", "result", "error")
        return cls(**{name: data[name] for name in names}, outputs=data.get("outputs") or [], raw=data)

    @property
    def is_done(self) -> bool:
        return self.status in TERMINAL


class MelFusionClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, **httpx_options):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, **httpx_options)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.http.close()

    def _job(self, response: httpx.Response) -> Job:
        if response.is_error:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:200], "field": None}
            raise ServiceError(response.status_code, error["code"], error["message"], error.get("field"))
        return Job.from_json(response.json())

    def submit(
        self,
        image: str | os.PathLike | bytes | None = None,
        caption: str | None = None,
        *,
        request: GenerationRequest | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        expires_in: int | None = None,
        cancel_after: float | str | None = None,
        **fields: Any,
    ) -> Job:
        """POST /jobs: a photo, a caption, or both. The other generation fields are GenerationRequest's, as
        keywords (`seconds=10`) or as `request`; an unknown name raises TypeError here, a value out of the
        service's range comes back as a 422 ServiceError naming it (ranges are in /openapi.json). Unset
        means the service's default. `expires_in`: seconds the job and its files are kept once it ends.
        `cancel_after` (seconds, or a duration like "5m"): a deadline; not started by then, the job ends
        `aborted`; still running, it is canceled.
        Retrying with the same `idempotency_key` can never create a second job.
        """
        if request is not None and (caption is not None or fields):
            raise TypeError("give the fields either in `request` or as keywords, not both")
        request = request or GenerationRequest(caption=caption, **fields)
        defaults = {f.name: f.default for f in dataclass_fields(GenerationRequest)}
        form = {name: value for name, value in request.to_dict().items() if value != defaults[name]}
        form |= {name: OFF for name, value in form.items() if value is None}  # null where the default is not
        form |= {"webhook_url": webhook_url, "webhook_events": webhook_events, "expires_in": expires_in}
        parts = [(name, (None, str(item))) for name, value in form.items() if value is not None
                 for item in (value if isinstance(value, list) else [value])]  # fmt: skip
        if image is not None:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            parts.append(("image", ("image", data, "application/octet-stream")))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if cancel_after is not None:
            headers["Cancel-After"] = str(cancel_after)
        response = self.http.post("/jobs", files=parts, headers=headers)  # multipart, with or without a photo
        return self._job(response)

    def get(self, job_id: str) -> Job:
        return self._job(self.http.get(f"/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return self._job(self.http.post(f"/jobs/{job_id}/cancel"))

    def workers_available(self) -> int:
        """Warmed-up workers the service sees (its /readyz body); 0 while it is not ready. The service takes
        jobs without any (they wait in the queue), so this is for whoever wants them to start at once."""
        response = self.http.get("/readyz")
        return (response.json().get("workers_available") or 0) if response.status_code == 200 else 0

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 600.0,
        poll_seconds: float = 0.25,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Follow the job's event stream until it ends (polling if the stream cannot be had or breaks);
        `on_progress` sees every change of status or progress.

        Raises:
            TimeoutError: the job did not end within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        seen = {"last": None}

        def report(job: Job) -> None:
            if on_progress is not None and (job.status, job.progress) != seen["last"]:
                on_progress(job)
                seen["last"] = (job.status, job.progress)

        try:
            job = self._wait_streaming(job_id, deadline=deadline, report=report)
            if job is not None:
                return job
        except (httpx.HTTPError, ValueError, KeyError):
            pass  # no stream (proxy, older server) or it broke: poll instead
        while True:
            job = self.get(job_id)
            report(job)
            if job.is_done:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:g} s")
            time.sleep(poll_seconds)

    def _wait_streaming(self, job_id: str, *, deadline: float, report: Callable[[Job], None]) -> Job | None:
        """The finished job from `GET /jobs/{id}/events`, or None if the stream ended without it."""
        current: dict[str, Any] | None = None
        read_timeout = max(1.0, deadline - time.monotonic())
        timeouts = httpx.Timeout(30.0, read=read_timeout)
        with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=timeouts) as response:
            if response.status_code == 404:
                return None  # an older server without streams; polling says whether the job exists
            if response.is_error:
                response.read()
                self._job(response)  # raises ServiceError (401...)
            event = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data = json.loads(line.removeprefix("data:").strip())
                    if event in ("status", "completed"):
                        current = data
                    elif event == "progress" and current is not None:
                        current = {**current, **data}
                    if current is not None:
                        report(Job.from_json(current))
                    if event == "completed":
                        return Job.from_json(current)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {current and current['status']} at the deadline")
        return None

    def download(self, job: Job, path: str | os.PathLike, *, output: int = 0) -> Path:
        """Fetch output `output`'s clip (0: `result`; in the job's `format`, see `result["content_type"]`) from
        its URL and check it against the sha256 the service reported."""
        if job.result is None:
            raise ValueError(f"job {job.id} is {job.status}; it has no result")
        result = (job.outputs or [job.result])[output]
        # A plain GET: the URL carries its own signature, and S3 refuses a second one in an Authorization header.
        url = self.http.base_url.join(result["url"])  # relative when the service has no public URL set
        response = httpx.get(url, follow_redirects=True, timeout=self.http.timeout)
        response.raise_for_status()
        if hashlib.sha256(response.content).hexdigest() != result["sha256"]:
            raise ServiceError(response.status_code, "checksum_mismatch", "downloaded bytes differ", "result")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        return path

"""The API's writes to the store on a request's path (storing a photo, deleting one), each answered within
`store_wait_seconds`.

A hung store (a SIGSTOPped SeaweedFS, a black-holed network) answers nothing, so each call waited out the
S3 timeout, and a refused POST paid it twice (the upload, then deleting the photo): 7-8 s, with the photo
left behind when the store woke up and finished the upload. Here an upload runs on a thread of its own
and the request waits for it at most the deadline, then answers 503; an upload that outlives that, or
fails, has its photo deleted once it has ended, by one background thread that retries while the store
stays down (the workers' sweep removes whatever a restart of the API forgets). Deletions never hold a
request at all.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from jobs.storage import Storage, StorageUnavailable

log = logging.getLogger(__name__)

DELETE_BACKOFF_SECONDS = (1.0, 30.0)  # first and longest wait between attempts to delete a photo
DELETE_RETRY_SECONDS = 3600.0  # then the sweep's


class GuardedStore:
    """`put` within a deadline and `delete` in the background, over `storage`."""

    def __init__(self, storage: Storage, *, wait_seconds: float, threads: int):
        self.storage, self.wait_seconds = storage, wait_seconds
        self.uploads = ThreadPoolExecutor(threads, thread_name_prefix="store")
        self.doomed: dict[str, tuple[float, float, float]] = {}  # key -> (next attempt, delay, give up at)
        self.lock = threading.Condition()
        self.stopping = False
        self.deleter = threading.Thread(target=self._delete_doomed, name="store-deleter", daemon=True)
        self.deleter.start()

    def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store `data` under `key`, or raise StorageUnavailable if the store has not done so within the
        deadline (the upload is then abandoned: skipped if it has not begun, its object deleted once it ends).
        """
        abandoned = threading.Event()

        def upload() -> None:
            if not abandoned.is_set():  # the request may have answered 503 before a thread was free
                self.storage.put(key, data, content_type=content_type)

        running = self.uploads.submit(upload)
        try:
            running.result(timeout=self.wait_seconds)
        except FutureTimeout:
            abandoned.set()
            running.add_done_callback(lambda _: self.delete(key))
            raise StorageUnavailable(f"the store did not take the upload within {self.wait_seconds:g} s") from None
        except StorageUnavailable:
            self.delete(key)  # a store that failed us may still complete the upload once it recovers
            raise

    def delete(self, key: str) -> None:
        """Delete `key` soon, retrying while the store is down; returns at once."""
        with self.lock:
            self.doomed.setdefault(key, (0.0, DELETE_BACKOFF_SECONDS[0], time.monotonic() + DELETE_RETRY_SECONDS))
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.uploads.shutdown(wait=False, cancel_futures=True)

    def _delete_doomed(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self._due():
                    next_at = min((at for at, _, _ in self.doomed.values()), default=None)
                    self.lock.wait(None if next_at is None else max(0.0, next_at - time.monotonic()))
                if self.stopping:
                    return
                key = self._due()
                _, delay, give_up_at = self.doomed.pop(key)
            try:
                self.storage.delete(key)
            except Exception as exc:
                if time.monotonic() > give_up_at:
                    log.error("could not delete %s (%s); leaving it to the sweep", key, exc)
                    continue
                log.warning("could not delete %s (%s); retrying in %g s", key, exc, delay)
                with self.lock:
                    retry = (time.monotonic() + delay, min(2 * delay, DELETE_BACKOFF_SECONDS[1]), give_up_at)
                    self.doomed.setdefault(key, retry)

    def _due(self) -> str | None:
        now = time.monotonic()
        return next((key for key, (at, _, _) in self.doomed.items() if at <= now), None)

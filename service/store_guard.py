"""The API's writes to the store on a request's path (storing a photo, deleting one), each waited for at
most `store_wait_seconds`.

A hung store (a SIGSTOPped SeaweedFS, a black-holed network) answers nothing, so each call waited out the
S3 timeout, and a refused POST paid it twice (the upload, then deleting the photo): 7-8 s, with the photo
left behind when the store woke up and finished the upload. Here a call runs on a thread of its own and
the request waits for it at most the deadline: an upload then answers 503, and a deletion goes on in the
background. An upload that outlives the deadline, or fails, has its photo deleted once it has ended; one
background thread retries deletions while the store stays down (the workers' sweep removes whatever a
restart of the API forgets).
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
    """`put` and `delete` over `storage`, each within a deadline; what the deadline cuts short is cleaned up."""

    def __init__(self, storage: Storage, *, wait_seconds: float, threads: int):
        self.storage, self.wait_seconds = storage, wait_seconds
        self.calls = ThreadPoolExecutor(threads, thread_name_prefix="store")
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

        running = self.calls.submit(upload)
        try:
            running.result(timeout=self.wait_seconds)
        except FutureTimeout:
            abandoned.set()
            running.add_done_callback(lambda _: self.delete_later(key))
            raise StorageUnavailable(f"the store did not take the upload within {self.wait_seconds:g} s") from None
        except StorageUnavailable:
            self.delete_later(key)  # a store that failed us may still complete the upload once it recovers
            raise

    def delete(self, key: str) -> None:
        """Delete `key` within the deadline if the store answers, else in the background, retried while the
        store is down."""
        try:
            self.calls.submit(self.storage.delete, key).result(timeout=self.wait_seconds)
        except Exception:  # too slow, or failed: the background thread tries again
            self.delete_later(key)

    def delete_later(self, key: str) -> None:
        """Delete `key` in the background, retrying while the store is down; returns at once."""
        with self.lock:
            self.doomed.setdefault(key, (0.0, DELETE_BACKOFF_SECONDS[0], time.monotonic() + DELETE_RETRY_SECONDS))
            self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.calls.shutdown(wait=False, cancel_futures=True)

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

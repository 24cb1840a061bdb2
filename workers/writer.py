"""Results leave the generating thread: encoding each clip's WAV and spectrogram PNG, uploading them and
ending the job run on one background thread, so the next batch starts as soon as the last one's audio is
on the host (writing a batch of 8 took ~0.5 s between batches on the GPU thread).

One thread, first in first out: a job's outcome is announced after everything the generating thread said
about it (start, progress), since a row is handed over only once its generation is over. The queue is
bounded, so storage slower than generation holds the generating thread back instead of piling up clips.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_STOP = None  # what `close` queues: the thread ends after everything queued before it


class ResultWriter:
    """Runs each job's last steps in submission order.

    Args:
        max_pending: tasks that may wait; `submit` blocks beyond that.
        on_failure: called with the job id of a task that raised (its outcome could not be recorded, e.g.
            Redis stayed down): the worker stops vouching for the job, so the janitor reclaims it.
    """

    def __init__(self, max_pending: int, on_failure: Callable[[str], None]):
        self._tasks: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue(maxsize=max_pending)
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._thread.start()

    def submit(self, job_id: str, task: Callable[[], None]) -> None:
        """Run `task`, the end of job `job_id`, after every task submitted before it (blocks while
        `max_pending` are waiting)."""
        self._tasks.put((job_id, task))

    def close(self) -> None:
        """Finish every submitted task, then stop the thread."""
        self._tasks.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._tasks.get()) is not _STOP:
            job_id, task = item
            try:
                task()
            except Exception:
                log.exception("job %s: its result could not be recorded", job_id)
                self._on_failure(job_id)

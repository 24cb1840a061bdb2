"""What a worker needs of a model family, as a `Protocol`: `MelFusionPipeline` is one `Engine`; a second
family plugs into the worker by implementing these few members (and being returned by the worker's loader),
without reading the worker. Torch-free: only names for type checkers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .limits import GenerationLimits
from .request import GenerationRequest

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from .shapes import ShapeBuckets


class Clips(Protocol):
    """What `Engine.generate` returns: one waveform row per clip, in request order (each request's
    `num_outputs` variations together), and the seed each row used."""

    audios: np.ndarray  # (clips, samples), float in [-1, 1]; a clip shorter than the longest ends in zeros
    sampling_rate: int
    seeds: list[int]
    lengths: list[int]  # samples of each clip
    errors: list[Exception | None] | None  # per clip: why it is unusable (NaN/inf), else None

    def clip(self, row: int) -> np.ndarray:
        """Row `row`'s waveform at its own length."""

@runtime_checkable
class Engine(Protocol):
    @property
    def limits(self) -> GenerationLimits:
        """The bounds and defaults its requests are resolved against."""

    @property
    def image_resolution(self) -> int:
        """The square side it works at: the worker shrinks decoded photos to about this at once."""

    def generate(
        self,
        requests: list[GenerationRequest],
        images: list[Image.Image | None],
        callback: Callable[[Any], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Clips:
        """Every clip of resolved requests sharing one `batch_key(limits)`, in one call. `callback` gets an object
        with `step`, `total` and `fraction` after each step; `should_cancel()` True stops it
        (GenerationCancelled)."""

    @property
    def shape_misses(self) -> Counter[str]:
        """Calls that fit no warmed shape, by what missed; the worker reports and clears them after a batch."""

    def warm_up(self, buckets: ShapeBuckets) -> int:
        """Run every shape of `buckets` once, so that no job pays for compilation; returns the calls made."""

    def spectrogram_png(self, audio: np.ndarray) -> bytes:
        """A picture of one clip, stored beside it."""

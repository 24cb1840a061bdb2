"""The shapes a compiled pipeline is warmed on, and how every call is padded up to one of them.

`torch.compile` keeps one graph per input shape (CUDA graphs above all), so a compiled pipeline should
only ever meet shapes it has already run. What sets a UNet call's shape: the rows of the batch (doubled
by classifier-free guidance), the clip's latent frames and the caption's token count on the music side,
the number of new photos on the image side. `ShapeBuckets` names the warmed values of each; the pipeline
rounds a call up to them: padded rows are computed and thrown away, captions are padded with masked
tokens (the same clip up to rounding), and a clip is cut from the latent of its length bucket (a
different clip from an unbucketed one of that length: see README, "Static shapes").

A call that fits no bucket still runs, at its own shape, and is counted as a miss: the compiled pipeline
then compiles a new graph in the middle of serving, which is what the buckets exist to prevent.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CAPTION_TOKENS = (32, 128)  # most captions fit 32 T5 tokens; ~100 words fit 128


@dataclass(frozen=True)
class ShapeBuckets:
    """Warmed sizes; each tuple is kept sorted, smallest first.

    A call without CFG has half the UNet rows of a call with it, so it is padded to the UNet rows of a
    warmed CFG call (2·b) instead: CFG on or off, the music UNet meets the same graphs.
    """

    batch_sizes: tuple[int, ...]  # requests per call (and new photos per image-side pass)
    seconds: tuple[float, ...]  # clip-length buckets
    caption_tokens: tuple[int, ...] = DEFAULT_CAPTION_TOKENS  # caption lengths in tokens, end token included

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "seconds", "caption_tokens"):
            values = tuple(sorted(set(getattr(self, name))))
            if not values or values[0] <= 0:
                raise ValueError(f"{name} must be positive and not empty, got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)

    @property
    def graphs(self) -> int:
        """Graphs a compiled pipeline holds after warm-up: music UNet per (rows, clip, caption) plus image UNet
        per batch size (both UNets share one forward, hence one dynamo cache)."""
        return len(self.batch_sizes) * (len(self.seconds) * len(self.caption_tokens) + 1)

    def rows_for(self, rows: int, with_unconditional: bool) -> int | None:
        """The rows to run `rows` requests with (None: more than any warmed batch)."""
        per_request = 2 if with_unconditional else 1
        unet_rows = smallest_at_least([2 * size for size in self.batch_sizes], rows * per_request)
        return None if unet_rows is None else unet_rows // per_request

    def image_rows_for(self, images: int) -> int | None:
        """The image-UNet batch for `images` new photos (None: more than any warmed batch)."""
        return smallest_at_least(self.batch_sizes, images)

    def caption_tokens_for(self, tokens: int) -> int | None:
        """The padded caption length for a longest caption of `tokens` (None: longer than every bucket)."""
        return smallest_at_least(self.caption_tokens, tokens)


def smallest_at_least(values, needed):
    """The smallest of the sorted `values` that is >= `needed`, or None."""
    return next((value for value in values if value >= needed), None)

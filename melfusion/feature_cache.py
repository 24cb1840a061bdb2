"""A bounded LRU of ImageFeatures, so a photo sent again (other caption, seed or guidance) skips the
image side: DDIM inversion and re-denoising are 2 of every 3 UNet calls, on the larger UNet."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from PIL import Image

from .attention import ImageFeatures


class ImageFeatureCache:
    """Least-recently-used ImageFeatures within `max_bytes`, keyed by what determines them."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()

    @staticmethod
    def key(square_image: Image.Image, grid: tuple, synapse_config: dict) -> str:
        """The SD-sized pixels (so re-encodings of one photo agree), the grid and the synapse layout."""
        digest = hashlib.sha256(square_image.tobytes())
        digest.update(json.dumps([square_image.size, grid, dict(synapse_config)], sort_keys=True).encode())
        return digest.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(features.nbytes() for features in self._entries.values())

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> ImageFeatures | None:
        features = self._entries.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: ImageFeatures) -> None:
        if features.nbytes() > self.max_bytes:
            return
        self._entries[key] = features
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

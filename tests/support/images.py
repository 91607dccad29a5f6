"""Test images for the engines: the same inputs for every engine's tests, so their captions compare."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise_and_flat_images(n: int = 6, seed: int = 0) -> list[Image.Image]:
    """Noise of several sizes and aspect ratios, and flat colours."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(Image.new("RGB", (40, 40), ("red", "navy", "olive", "white")[i % 4]))
        else:
            h, w = 32 + 16 * (i % 2), 32 + 24 * (i % 3)
            out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out

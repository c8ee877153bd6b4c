"""Augmentation by small random translations of the images.

A digit moved by a pixel or two is still the same digit, so shifting every
training image by a fresh random (dx, dy) each epoch gives the network many
more distinct examples for free. Vectorised: the image set is padded once,
and each of the (2k+1)² offsets is one slice over the images that drew it.
"""

from __future__ import annotations

import numpy as np


def pad(images: np.ndarray, k: int) -> np.ndarray:
    """Images (m, 28, 28) with a k-pixel border of zeros (background), done once per run."""
    return np.pad(images, ((0, 0), (k, k), (k, k)))


def shift(padded: np.ndarray, k: int, order: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
    """Write padded[order], each shifted by its own random offset in [-k, k]², into out (m, 28, 28).

    `out[i]` is image `order[i]` moved by (dy, dx): a pixel at (r, c) goes to
    (r + dy, c + dx), and what moves in from the border is background.
    """
    side = padded.shape[1] - 2 * k
    offsets = rng.integers(-k, k + 1, size=(2, len(order)))
    code = (offsets[0] + k) * (2 * k + 1) + (offsets[1] + k)
    for c in range(int((2 * k + 1) ** 2)):
        rows = np.flatnonzero(code == c)
        if rows.size == 0:
            continue
        dy, dx = c // (2 * k + 1) - k, c % (2 * k + 1) - k
        # output (r, c) reads padded (r - dy + k, c - dx + k)
        out[rows] = padded[order[rows], k - dy : k - dy + side, k - dx : k - dx + side]

"""The one preprocessing step between a 28×28 image and the network's input.

Training, offline evaluation and the service all call `to_vectors`, so a
pixel means the same thing everywhere and served predictions match offline
ones bit for bit.
"""

from __future__ import annotations

import numpy as np

IMAGE_SIDE = 28
N_INPUTS = IMAGE_SIDE * IMAGE_SIDE
DTYPE = np.float32

DESCRIPTION = {
    "input": "28x28 grayscale, light ink on a dark background (as MNIST), values 0..255",
    "scale": "x / 255 -> [0, 1]",
    "flatten": "row-major, 784 values",
    "dtype": "float32",
}


def to_vectors(images: np.ndarray) -> np.ndarray:
    """Images of shape (m, 28, 28), (28, 28), (m, 784) or (784,), values 0..255,
    as float32 rows of 784 values in [0, 1]. Shape (m, 784)."""
    a = np.asarray(images)
    if a.shape[-2:] == (IMAGE_SIDE, IMAGE_SIDE) or (a.shape[-1] == N_INPUTS and a.ndim <= 2):
        a = a.reshape(-1, N_INPUTS)
    else:
        raise ValueError(f"expected 28x28 images or 784 values, got shape {a.shape}")
    return a.astype(DTYPE) / DTYPE(255.0)

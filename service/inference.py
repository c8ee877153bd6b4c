"""The forward pass for a batch of 28×28 images, and its JSON form.

Images go through `core.preprocess.to_vectors` and `core.network.probabilities`,
the functions training and offline evaluation use, as one (m, 784) matrix:
one matrix product per layer for the whole batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.modelstore import LoadedModel
from core.network import probabilities
from core.preprocess import to_vectors


def classify(model: LoadedModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits (m,) and probabilities (m, 10) for images (m, 28, 28) valued 0..255."""
    return classify_inputs(model, to_vectors(images))


def classify_inputs(model: LoadedModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits (m,) and probabilities (m, 10) for network input rows x (m, 784) in [0, 1]."""
    p = probabilities(model.net, x)
    return p.argmax(axis=1), p


def prediction(digit: int, probs: np.ndarray) -> dict[str, Any]:
    """One prediction as the API returns it."""
    values = probs.tolist()
    return {"digit": digit, "confidence": values[digit], "probabilities": values}


def model_ref(model: LoadedModel) -> dict[str, Any]:
    return {"name": model.name, "version": model.version}

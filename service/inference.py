"""The forward pass for a batch of 28×28 images, and its JSON form.

Images go through `core.preprocess.to_vectors` and `core.network.probabilities`,
the functions training and offline evaluation use, as one (m, 784) matrix:
one matrix product per layer for the whole batch. `explain_images` adds
∂ log p_digit / ∂x (`core.network.log_prob_input_gradient`); only /explain and
/predict?explain=1 call it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.modelstore import LoadedModel
from core.network import log_prob_input_gradient, probabilities
from core.preprocess import IMAGE_SIDE, to_vectors


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


Explained = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # digits, probabilities, x, ∂ log p / ∂x


def explain_images(model: LoadedModel, images: np.ndarray) -> Explained:
    """Digits, probabilities, the input rows x (m, 784) the network saw and ∂ log p_digit / ∂x,
    for images (m, 28, 28) valued 0..255."""
    x = to_vectors(images)
    digits, p, saliency = explain_inputs(model, x)
    return digits, p, x, saliency


def explain_inputs(model: LoadedModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits (m,), probabilities (m, 10) and ∂ log p_digit / ∂x (m, 784) for input rows x in [0, 1].

    The digits come from `classify_inputs`, the very function /predict runs, so
    the explained digit is the predicted one; the gradient then costs one more
    forward pass (which keeps its z's) and one backward pass.
    """
    digits, p = classify_inputs(model, x)
    return digits, p, log_prob_input_gradient(model.net, x, digits)


def explanation(digit: int, probs: np.ndarray, x: np.ndarray, saliency: np.ndarray) -> dict[str, Any]:
    """One explained prediction as the API returns it: the input seen and the map, as 28 rows of 28."""
    return {
        **prediction(digit, probs),
        "input": x.reshape(IMAGE_SIDE, IMAGE_SIDE).tolist(),
        "saliency": saliency.reshape(IMAGE_SIDE, IMAGE_SIDE).tolist(),
    }

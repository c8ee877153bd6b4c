"""The one data plane behind every protocol: /predict and /explain, V2 REST and gRPC.

Routes and RPCs only translate their wire format to arrays and back. Everything
between (which model and version answers, the forward pass, the gradient, and
the prediction metrics) happens here, once, so the protocols cannot drift
apart: a version switch, a canary's share, a pinned version's metrics label
apply alike whatever the transport. MLServer's `DataPlane` plays the same role.

`create_app` builds one per app (`app.extensions["dataplane"]`). It needs no
Flask context, so gRPC's threads call it exactly as REST's views do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.modelstore import LoadedModel
from service import v2_codec
from service.errors import ApiError
from service.inference import Explained, classify, classify_inputs, explain_images
from service.metrics import Metrics, count_predictions, version_label
from service.models import ModelManager
from service.registry import ModelRegistry


class DataPlane:
    """Model lookup, inference, explanation and prediction metrics over one model registry."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics | None, max_batch: int) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_batch = max_batch  # most inputs in one request (MAX_BATCH), whatever the protocol

    # --- readiness and status ----------------------------------------------------

    def readiness(self) -> tuple[LoadedModel | None, str]:
        """The default model's stable version, or None and why there is none (/readyz)."""
        manager = self.registry.default
        model = manager.current()
        return model, "" if model is not None else manager.unready_reason()

    def ready(self) -> bool:
        """Whether the default model has a version to serve (V2's server readiness)."""
        return self.registry.default.current() is not None

    @property
    def default_name(self) -> str:
        return self.registry.default_name

    def statuses(self) -> list[dict[str, Any]]:
        """Every served model's status (/models, V2's repository index), the default first."""
        return [manager.status() for manager in self.registry.managers()]

    # --- which model answers -------------------------------------------------------

    def manager(self, name: str | None) -> ModelManager:
        """The manager of `name` (None: MODEL_NAME); 404 model_not_found for any other."""
        return self.registry.get(name)

    def model(self, name: str | None, version: int | None = None, label: str | None = None) -> LoadedModel:
        """The version that answers: pinned by `version` or `label`, else the model's stable
        version or, for its share of requests, its canary."""
        return self.registry.get(name).get(version, label)

    def v2_model(self, name: str, version: str | None) -> LoadedModel:
        """The Open Inference Protocol's lookup (V2 REST and gRPC alike): the model is always named,
        and a bad name or version is the protocol's error, not /predict's."""
        if not name:  # the registry's default is for /predict; the protocol always names its model
            raise self._unknown_v2_model(name)
        try:
            manager = self.registry.get(name)
        except ApiError:
            raise self._unknown_v2_model(name) from None
        return manager.get(v2_codec.version_number(version))

    def v2_model_ready(self, name: str, version: str | None) -> bool:
        """False for a known model or version that is not loaded; an unknown one is an error."""
        try:
            self.v2_model(name, version)
        except ApiError as e:
            if e.status != 503:
                raise
            return False
        return True

    def _unknown_v2_model(self, name: str) -> v2_codec.V2Error:
        served = ", ".join(self.registry.names())
        return v2_codec.V2Error(404, f"unknown model {name!r}; this server serves {served}")

    def versions(self, model: LoadedModel) -> list[int]:
        """Every version a client may pin (V2's model metadata): the valid ones, and `model`."""
        return sorted({model.version, *self.registry.get(model.name).servable_versions()})

    # --- inference ------------------------------------------------------------------

    def predict(self, model: LoadedModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Digits (m,) and probabilities (m, 10) for images (m, 28, 28) valued 0..255, counted."""
        digits, probs = classify(model, images)
        self.count(model, digits, probs)
        return digits, probs

    def explain(self, model: LoadedModel, images: np.ndarray) -> Explained:
        """`predict` plus the input seen and ∂ log p_digit / ∂input; an explained prediction is
        counted as a prediction."""
        digits, probs, x, saliency = explain_images(model, images)
        self.count(model, digits, probs)
        return digits, probs, x, saliency

    def infer(self, model: LoadedModel, x: np.ndarray) -> dict[str, np.ndarray]:
        """V2's two outputs by name for network input rows x (m, 784) in [0, 1], counted."""
        outputs = v2_codec.output_tensors(*classify_inputs(model, x))
        self.count(model, outputs["digit"], outputs["probabilities"])
        return outputs

    def count(self, model: LoadedModel, digits: np.ndarray, probs: np.ndarray) -> None:
        """The prediction metrics of one answer, under the version that answered, the same for
        every protocol (`metrics.count_predictions`)."""
        if self.metrics is not None:
            label = version_label(self.registry, model)
            digits_seen = np.asarray(digits).ravel().tolist()
            count_predictions(self.metrics, model.name, label, digits_seen, np.max(probs, axis=1).tolist())

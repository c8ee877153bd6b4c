"""Which versions answer unpinned requests: the live set, and how it is chosen.

The promotion policy (`core.promotion`, PROMOTION) decides from the versions'
recorded accuracies and the model's `labels.json` (`core.labels`), re-read at
every scan; MODEL_VERSION stands above both. A canary, when the labels set one,
answers its share of unpinned requests. The live pair (stable, canary) is one
`Live`, swapped in one assignment, so a request never sees a stable from one
decision and a canary from another.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from core import labels as labels_file
from core import promotion
from core.labels import InvalidLabels, Labels
from core.modelstore import LoadedModel
from service.errors import ApiError
from service.versions import VersionStore, rejection_reason

log = logging.getLogger("service.models")  # one logger for a model's whole lifecycle


@dataclass(frozen=True)
class Live:
    """What answers unpinned requests: stable, and a canary taking `canary_percent` of them."""

    stable: LoadedModel
    canary: LoadedModel | None = None
    canary_percent: float = 0.0
    held: tuple[tuple[int, str], ...] = ()

    def models(self) -> tuple[LoadedModel, ...]:
        return (self.stable,) if self.canary is None else (self.stable, self.canary)

    def pick(self, rng: random.Random) -> LoadedModel:
        """An unpinned request's model: the canary for its share of requests, else stable."""
        if self.canary is not None and rng.random() * 100 < self.canary_percent:
            return self.canary
        return self.stable

    def labelled(self, label: str, name: str) -> LoadedModel:
        """The version a `label` (checked by `check_label`) pins; 409 for a canary not set."""
        if label == "stable":
            return self.stable
        if self.canary is None:
            raise ApiError(409, "no_canary", f"model {name!r} has no canary set (make canary VERSION=N)")
        return self.canary


def check_label(label: str) -> None:
    """400 for a label labels.json does not have (stable, canary)."""
    if label not in labels_file.LABELS:
        raise ApiError(
            400, "invalid_label", f"label must be one of {list(labels_file.LABELS)}, got {label!r}"
        )


class LiveChoice:
    """The policy's decision over a model's versions and labels, validated into a `Live`."""

    def __init__(
        self,
        models_dir: Path,
        name: str,
        pinned: int | None,
        policy: str,
        min_accuracy: float,
        tolerance: float,
    ) -> None:
        if policy not in promotion.POLICIES:
            raise ValueError(f"unknown promotion policy {policy!r}; use one of {promotion.POLICIES}")
        self.models_dir = models_dir
        self.name = name
        self.pinned = pinned
        self.policy = policy
        self.min_accuracy = min_accuracy
        self.tolerance = tolerance
        self.labels = Labels()
        self.labels_error: str | None = None

    def read_labels(self) -> None:
        """Re-read labels.json; a broken file is logged once and the last good labels stay."""
        try:
            self.labels = labels_file.read(self.models_dir, self.name)
        except Exception as e:  # InvalidLabels, or any surprise: the labels' fault, not the model's
            reason = str(e) if isinstance(e, InvalidLabels) else rejection_reason(e)
            if reason != self.labels_error:
                log.warning("model %s: ignoring %s: %s", self.name, labels_file.LABELS_FILE, reason)
            self.labels_error = reason
            return
        self.labels_error = None

    def choose(self, versions: VersionStore) -> Live | None:
        """The policy's decision, its versions validated; a version that fails is rejected and
        the policy asked again, so this ends after at most one round per version. None: keep
        the last good model (if any)."""
        for _ in range(len(versions.infos) + 1):
            decision = self._decide(versions.accuracies())
            if decision.stable is None:
                return None
            stable = versions.validated(decision.stable)
            if stable is None:
                continue
            canary = None
            if decision.canary is not None:
                canary = versions.validated(decision.canary)
                if canary is None:
                    continue
            percent = decision.canary_percent if canary else 0.0
            return Live(stable, canary, percent, tuple(decision.held.items()))
        return None

    def _decide(self, valid: dict[int, float | None]) -> promotion.Decision:
        if self.pinned is not None:  # MODEL_VERSION stands above labels and policy
            return promotion.Decision(self.pinned if self.pinned in valid else None)
        return promotion.decide(valid, self.labels, self.policy, self.min_accuracy, self.tolerance)

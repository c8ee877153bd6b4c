"""Which valid version goes live: the promotion policy, a pure function of the repository.

Every worker and replica computes the decision from the same inputs (the
versions on disk with their recorded `metrics.test_accuracy`, and
labels.json), never from its own history, so they all agree whenever they
started.

The baseline is the `stable` label when it names a valid version; without
one it is the model's first (lowest) valid version, which has nothing to be
compared with and so goes live whatever its accuracy (this is how a model
like mnist-seed, at ≈95%, is served). Versions newer than every labelled one
are then taken in order, and the policy says whether each replaces the
baseline or is held:

    latest   every one goes live (the newest valid version is served)
    gate     it goes live if its accuracy is ≥ MIN_ACCURACY and not below the
             baseline's by more than PROMOTION_TOLERANCE; otherwise held
    manual   every one is held until promoted by hand

Versions at or below a labelled one were covered by a human decision, so they
are neither promoted nor held again: a rollback stays rolled back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from core.labels import Labels
from core.settings import PROMOTION_POLICIES as POLICIES
from core.settings import Settings

# The defaults of PROMOTION, MIN_ACCURACY and PROMOTION_TOLERANCE, as core.settings declares them.
DEFAULT_POLICY = Settings().promotion
DEFAULT_MIN_ACCURACY = Settings().min_accuracy
DEFAULT_TOLERANCE = Settings().promotion_tolerance


@dataclass(frozen=True)
class Decision:
    stable: int | None
    canary: int | None = None
    canary_percent: float = 0.0
    held: dict[int, str] = field(default_factory=dict)  # version -> why it is not live


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def gate_reason(
    accuracy: float | None,
    baseline: int,
    baseline_accuracy: float | None,
    min_accuracy: float,
    tolerance: float,
) -> str | None:
    """Why a version may not replace `baseline`, or None when it may."""
    if accuracy is None:
        return "no recorded test accuracy (metrics.test_accuracy)"
    if accuracy < min_accuracy:
        return f"test accuracy {_pct(accuracy)} < MIN_ACCURACY {_pct(min_accuracy)}"
    if baseline_accuracy is not None and accuracy < baseline_accuracy - tolerance - 1e-12:
        return (
            f"test accuracy {_pct(accuracy)} < serving {_pct(baseline_accuracy)} − {100 * tolerance:.2f} "
            f"(version {baseline})"
        )
    return None


def decide(
    accuracies: Mapping[int, float | None],
    labels: Labels,
    policy: str = DEFAULT_POLICY,
    min_accuracy: float = DEFAULT_MIN_ACCURACY,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Decision:
    """The live versions for `accuracies` (valid version -> recorded test accuracy) and `labels`."""
    if policy not in POLICIES:
        raise ValueError(f"unknown promotion policy {policy!r}; use one of {POLICIES}")
    valid = sorted(accuracies)
    if not valid:
        return Decision(None)
    stable = labels.stable if labels.stable in accuracies else None
    floor = max(labels.named(), default=0)
    if stable is None:
        stable = valid[0]
        floor = max(floor, stable)
    held: dict[int, str] = {}
    for v in (v for v in valid if v > floor):
        if policy == "latest":
            stable = v
        elif policy == "manual":
            held[v] = "PROMOTION=manual: waiting to be promoted"
        else:
            reason = gate_reason(accuracies[v], stable, accuracies[stable], min_accuracy, tolerance)
            if reason is None:
                stable = v
            else:
                held[v] = reason
    canary = labels.canary if labels.canary in accuracies and labels.canary != stable else None
    return Decision(stable, canary, labels.canary_percent if canary is not None else 0.0, held)

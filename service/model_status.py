"""A model's status as /models (and V2's repository index) show it: every version on disk with
its metadata, which one is served, and why the others are not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.modelstore import recorded_accuracy

if TYPE_CHECKING:
    from service.models import ModelManager


def render_status(manager: ModelManager) -> dict[str, Any]:
    """The manager's state at this instant: its live set read once, so the entries agree."""
    live = manager.live()
    current = live.stable if live else None
    canary = live.canary if live else None
    held = dict(live.held) if live else {}
    infos = manager.versions.infos
    choice = manager.choice
    versions = []
    for v, info in sorted(infos.items()):
        if not info.valid:
            versions.append(_version_entry(v, info.metadata, "rejected", info.reason))
            continue
        if current and current.version == v:
            state, reason = "serving", None
        elif canary and canary.version == v:
            state, reason = "canary", None
        elif v in held:
            state, reason = "held", held[v]
        else:
            state, reason = "available", None
        versions.append(_version_entry(v, info.metadata, state, reason))
    if current is not None and current.version not in infos:
        reason = "deleted from the repository; still served from memory"
        versions.append(_version_entry(current.version, current.metadata, "serving", reason))
    return {
        "name": manager.name,
        "serving": current.version if current else None,
        "pinned": choice.pinned,
        "canary": canary.version if canary else None,
        "canary_percent": live.canary_percent if canary and live else 0.0,
        "policy": choice.policy,
        "labels": choice.labels.to_json(),
        "labels_error": choice.labels_error,
        "ready": current is not None,
        "reason": None if current else manager.unready_reason(),
        "poll_seconds": manager.poll_seconds,
        "last_scan": manager.last_scan,
        "versions": versions,
    }


def _version_entry(version: int, metadata: dict[str, Any], state: str, reason: str | None) -> dict[str, Any]:
    """One version as /models lists it; the checksums of its files are left out."""
    meta = {k: v for k, v in metadata.items() if k != "files"}
    entry: dict[str, Any] = {
        "version": version,
        "state": state,
        "accuracy": recorded_accuracy(meta),
        "created": meta.get("created"),
        "architecture": meta.get("architecture"),
    }
    if reason is not None:
        entry["reason"] = reason
    entry["metadata"] = meta
    return entry

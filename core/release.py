"""`python -m core.release promote|canary|rollback|show`: change which version serves, by hand.

The command writes `models/<name>/labels.json` (core.labels) on the host; every
worker and replica re-reads it at its next poll (MODEL_POLL_SECONDS), so one
command switches them all. It checks first and writes nothing when the input
is wrong: an unknown or invalid version, a percent outside 0..100, nothing
to roll back to, or a broken labels.json all exit with code 2 and one line
on stderr. On success it prints what changed.

MODELS_DIR and MODEL_NAME come from the environment, and PROMOTION,
MIN_ACCURACY and PROMOTION_TOLERANCE too, to know what serves when no label
says so yet: all read and checked by core.settings, as the service reads them,
so the command and the service never disagree on what serves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from core import labels, modelstore, promotion
from core.labels import InvalidLabels, Labels
from core.modelstore import InvalidModel
from core.settings import Settings, SettingsError


class UsageError(Exception):
    """Input that must not be written; exit code 2."""


def valid_accuracies(models_dir: Path, name: str) -> dict[int, float | None]:
    """Every version that loads and verifies, with its recorded test accuracy."""
    found = {}
    for v in modelstore.list_versions(models_dir, name):
        try:
            found[v] = modelstore.recorded_accuracy(modelstore.load(models_dir, name, v).metadata)
        except (InvalidModel, ValueError):
            continue
    return found


def _policy_settings(settings: Settings) -> tuple[str, float, float]:
    return settings.promotion, settings.min_accuracy, settings.promotion_tolerance


def _check_version(text: str, valid: dict[int, float | None], models_dir: Path, name: str) -> int:
    try:
        version = modelstore.parse_version(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if version not in valid:
        if version in modelstore.list_versions(models_dir, name):
            try:
                modelstore.load(models_dir, name, version)
            except (InvalidModel, ValueError) as e:
                raise UsageError(f"{name} version {version} is invalid: {e}") from None
        raise UsageError(f"{name} has no version {version} in {models_dir / name}")
    return version


def _percent(text: str) -> float:
    try:
        return labels.check_percent(float(text))
    except ValueError:
        raise UsageError(f"percent must be a number from 0 to 100, got {text!r}") from None


def apply(
    args: argparse.Namespace, models_dir: Path, name: str, settings: Settings | None = None
) -> tuple[Labels, Labels, int | None]:
    """The labels before and after the command, and the version serving before it, under the
    promotion settings of `settings` (default: the environment's)."""
    settings = Settings.from_env() if settings is None else settings
    modelstore.check_name(name)
    try:
        old = labels.read(models_dir, name)
    except InvalidLabels as e:
        raise UsageError(f"{labels.path(models_dir, name)}: {e}; fix or delete it first") from None
    valid = valid_accuracies(models_dir, name)
    if not valid:
        raise UsageError(f"{name} has no valid version in {models_dir / name}")
    serving = promotion.decide(valid, old, *_policy_settings(settings)).stable
    if args.command == "show":
        return old, old, serving
    if args.command == "promote":
        version = _check_version(args.version, valid, models_dir, name)
        previous = serving if serving != version else old.previous_stable
        new = replace(old, stable=version, previous_stable=previous)
        if old.canary == version:  # the canary graduated
            new = replace(new, canary=None, canary_percent=0.0)
    elif args.command == "canary":
        if args.clear:
            new = replace(old, canary=None, canary_percent=0.0)
        else:
            if args.version is None:
                raise UsageError("canary needs a version (or --clear)")
            version = _check_version(args.version, valid, models_dir, name)
            if version == serving:
                raise UsageError(f"version {version} is already stable; a canary must be another version")
            new = replace(old, stable=serving, canary=version, canary_percent=_percent(args.percent))
    else:  # rollback
        target = old.previous_stable
        if target is None:
            raise UsageError(f"{name} has no previous stable version to roll back to")
        if target not in valid:
            raise UsageError(f"previous stable version {target} is no longer valid or present")
        new = replace(old, stable=target, previous_stable=serving)
        if new.canary == target:
            new = replace(new, canary=None, canary_percent=0.0)
    labels.write(models_dir, name, new)
    return old, new, serving


def describe(name: str, old: Labels, new: Labels, serving: int | None) -> str:
    """What changed, one line per label."""
    lines = []
    before = {**old.to_json(), "stable": serving}
    after = new.to_json()
    after.setdefault("stable", serving)  # no label yet: the policy's choice serves
    for key in ("stable", "previous_stable", "canary", "canary_percent"):
        a, b = before.get(key), after.get(key)
        mark = "" if a == b else "   (changed)"
        lines.append(f"{name} {key}: {a if a is not None else '-'} -> {b if b is not None else '-'}{mark}")
    return "\n".join(lines)


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    settings = Settings() if settings is None else settings
    parser = argparse.ArgumentParser(
        prog="python -m core.release",
        description="Set a model's version labels (models/<name>/labels.json), read by every worker.",
        epilog="environment: MODELS_DIR, MODEL_NAME, PROMOTION, MIN_ACCURACY, PROMOTION_TOLERANCE "
        "(as the service reads them; docs/settings.md)",
    )
    parser.add_argument("--models-dir", default=settings.models_dir, help="[$MODELS_DIR or %(default)s]")
    parser.add_argument("--name", default=settings.model_name, help="[$MODEL_NAME or %(default)s]")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="make VERSION stable (the current stable becomes previous_stable)")
    p.add_argument("version")
    c = sub.add_parser("canary", help="send PERCENT of unpinned requests to VERSION")
    c.add_argument("version", nargs="?")
    c.add_argument("--percent", default="10", help="share of unpinned requests, 0..100 [10]")
    c.add_argument("--clear", action="store_true", help="remove the canary")
    sub.add_parser("rollback", help="make previous_stable stable again")
    sub.add_parser("show", help="print the labels and what serves")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = Settings.from_env()  # MIN_ACCURACY=98 stops here, as it stops the service
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    models_dir = Path(args.models_dir)
    try:
        old, new, serving = apply(args, models_dir, args.name, settings)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(args.name, old, new, serving))
    if args.command != "show":
        print(f"wrote {labels.path(models_dir, args.name)}; workers follow within MODEL_POLL_SECONDS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

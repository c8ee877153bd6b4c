"""`python -m trainer train|evaluate`: flags in, exit code out.

Every hyperparameter of `trainer.presets.Config` has a flag; an unset flag
keeps the preset's value. Paths and the model name default to the settings
DATA_DIR, MODELS_DIR and MODEL_NAME, read by core.settings as the service reads
them, so one `export` configures both. Expected failures (no dataset, bad flags, no
such model) print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from core.network import COSTS, HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from core.settings import Settings, SettingsError
from trainer.presets import DEFAULT_PRESET, DTYPES, INITS, OPTIMIZERS, PRESETS, SCHEDULES, Config, make_config

ENV_HELP = (
    "environment: DATA_DIR, MODELS_DIR, MODEL_NAME (the defaults of the flags above), "
    "MNIST_DOWNLOAD=0 forbids downloading a missing dataset, TQDM_DISABLE=1 hides the progress bar, "
    "TRAINER_THREADS (default 1) BLAS threads: the same seed gives the same weights only with the same count "
    "(docs/settings.md)."
)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 784,32,10, got {text!r}") from None
    return sizes


def _common(p: argparse.ArgumentParser, settings: Settings) -> None:
    p.add_argument("--data-dir", default=settings.data_dir, help="MNIST root [$DATA_DIR or %(default)s]")
    p.add_argument(
        "--models-dir", default=settings.models_dir, help="model repository [$MODELS_DIR or %(default)s]"
    )
    p.add_argument("--name", default=settings.model_name, help="model name [$MODEL_NAME or %(default)s]")


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """The parser; the flags' defaults come from `settings` (default: the environment's)."""
    settings = Settings.from_env() if settings is None else settings
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train the numpy MNIST network and publish it to models/<name>/<version>/, "
        "or re-score a published version.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,export-feedback}")

    tr = sub.add_parser(
        "train",
        help="train a network and publish it as the next version",
        description="Train per a preset, with any hyperparameter overridden by its flag; "
        "score on the test set; publish weights.npz, model.json and report.png.",
        epilog=ENV_HELP,
    )
    d = PRESETS[DEFAULT_PRESET]
    tr.add_argument(
        "--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="named configuration [%(default)s]"
    )
    _common(tr, settings)
    g = tr.add_argument_group("architecture (defaults come from the preset)")
    g.add_argument(
        "--sizes", type=_sizes, help=f"layer sizes, comma-separated (best: {','.join(map(str, d.sizes))})"
    )
    g.add_argument("--hidden-activation", choices=HIDDEN_ACTIVATIONS, help="hidden layers' σ")
    g.add_argument("--output-activation", choices=OUTPUT_ACTIVATIONS, help="output σ")
    g.add_argument("--cost", choices=tuple(COSTS), help="cost function")
    g.add_argument("--init", choices=INITS, help="weight init: N(0,1), N(0,1/n_in) or He N(0,2/n_in)")
    g.add_argument("--dtype", choices=DTYPES, help="float type of weights and arithmetic")
    g = tr.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="passes over the training images")
    g.add_argument("--batch-size", type=int, help="minibatch size m")
    g.add_argument("--lr", type=float, help="learning rate η (peak rate for schedules)")
    g.add_argument(
        "--lr-schedule", choices=SCHEDULES, help="η over time: constant, cosine decay, or step decay"
    )
    g.add_argument("--lr-min", type=float, help="cosine: η at the last step")
    g.add_argument("--lr-step-epochs", type=int, help="step: epochs between decays")
    g.add_argument("--lr-gamma", type=float, help="step: factor applied at each decay")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="plain SGD, SGD with momentum, or Adam")
    g.add_argument("--momentum", type=float, help="momentum coefficient μ")
    g.add_argument("--beta1", type=float, help="Adam β1")
    g.add_argument("--beta2", type=float, help="Adam β2")
    g.add_argument("--adam-eps", type=float, help="Adam ε")
    g.add_argument("--weight-decay", type=float, help="L2 coefficient λ (weights only): W <- (1-ηλ)W")
    g = tr.add_argument_group("data and reproducibility")
    g.add_argument("--shift", type=int, help="augment with random shifts of up to ±N pixels (0: off)")
    g.add_argument("--validation-size", type=int, help="images held out of the 60k training set")
    g.add_argument("--train-limit", type=int, help="train on only the first N training images")
    g.add_argument("--seed", type=int, help="seed of every random choice; same seed, same weights")
    g.add_argument(
        "--feedback",
        metavar="DIR",
        help="also train on the corrections stored in DIR (FEEDBACK_DIR), less their holdout",
    )
    g.add_argument(
        "--feedback-repeat",
        type=int,
        help="copies of each correction per epoch [enough for them to be 5%% of the examples, at most 100]",
    )
    g = tr.add_argument_group("output")
    g.add_argument("--no-publish", action="store_true", help="train and score, but publish nothing")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (summary lines only)")

    ev = sub.add_parser(
        "evaluate",
        help="re-score a published version on the test set",
        description="Load a published version (verified) and score it on the MNIST test set.",
        epilog=ENV_HELP,
    )
    _common(ev, settings)
    ev.add_argument("--version", help="version to score [newest]")
    ev.add_argument(
        "--feedback", metavar="DIR", help="also score on the current holdout of the corrections in DIR"
    )

    ex = sub.add_parser(
        "export-feedback",
        help="write the stored corrections as an .npz dataset",
        description="Read every record in DIR and write images (m, 28, 28) uint8, labels, holdout, "
        "ids, scored and model to an .npz: np.load(OUT) reads it.",
    )
    ex.add_argument("--feedback", metavar="DIR", required=True, help="the feedback folder (FEEDBACK_DIR)")
    ex.add_argument("--out", required=True, help="the .npz to write")

    # `python -m trainer --help` shows every flag, not just the two commands.
    parser.epilog = "\n".join(
        f"--- python -m trainer {name} ---\n{p.format_help()}"
        for name, p in (("train", tr), ("evaluate", ev), ("export-feedback", ex))
    )
    return parser


HYPERPARAMETERS = tuple(f.name for f in dataclasses.fields(Config))


def main(argv: Sequence[str] | None = None) -> int:
    from core.modelstore import InvalidModel
    from trainer.data import DataError

    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    if getattr(args, "feedback", None) is not None and not os.path.isdir(args.feedback):
        parser.error(f"--feedback {args.feedback}: no such folder (the service's FEEDBACK_DIR)")
    try:
        if args.command == "train":
            from trainer.run import train_and_publish

            try:
                config = make_config(args.preset, **{k: getattr(args, k) for k in HYPERPARAMETERS})
            except ValueError as e:
                parser.error(str(e))
            train_and_publish(
                config,
                args.preset,
                args.data_dir,
                args.models_dir,
                args.name,
                publish=not args.no_publish,
                progress=not args.no_progress and not settings.tqdm_disable,
                feedback_dir=args.feedback,
            )
        elif args.command == "export-feedback":
            from core.feedback import export_npz

            c = export_npz(args.feedback, args.out)
            print(f"{len(c)} corrections ({int(c.holdout.sum())} in the holdout) -> {args.out}")
        else:
            from core.modelstore import parse_version
            from trainer.data import load_mnist
            from trainer.evaluate import rescore

            version = None if args.version is None else parse_version(args.version)
            data = load_mnist(args.data_dir)
            r = rescore(
                args.models_dir, args.name, version, data.test_images, data.test_labels, args.feedback
            )
            recorded = "n/a" if r["recorded"] is None else f"{r['recorded']:.4f}"
            print(f"{r['name']} version {r['version']} ({r['path']})")
            print(f"test accuracy {r['accuracy']:.4f} on {r['n']} images (recorded at training: {recorded})")
            print("per class: " + "  ".join(f"{d}:{a:.3f}" for d, a in r["per_class_accuracy"].items()))
            if "feedback" in r:
                fb = r["feedback"]
                now = "n/a (empty holdout)" if fb["accuracy"] is None else f"{fb['accuracy']:.4f}"
                then = "n/a" if fb["recorded"] is None else f"{fb['recorded']:.4f}"
                print(
                    f"feedback holdout accuracy {now} on {fb['holdout_size']} records "
                    f"(recorded at training, on the holdout of then: {then})"
                )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (InvalidModel, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was published", file=sys.stderr)
        return 130
    return 0

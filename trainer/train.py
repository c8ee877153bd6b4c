"""The training loop: split, shuffle, augment, step, measure, once per epoch.

Every random choice (initial weights, shuffles, shifts) comes from one
`np.random.default_rng(seed)`, drawn in a fixed order, so the same seed on
the same machine gives bit-identical weights. The validation images are the
last `validation_size` of the 60k training set (as in Nielsen's split) and
are never trained on; the test set is not touched here at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from core.network import COSTS, Network, feedforward, new_network, one_hot
from core.preprocess import to_vectors
from trainer import augment
from trainer.presets import Config
from trainer.sgd import FusedSGD, learning_rate

MONITOR_SIZE = 10_000  # training images scored after each epoch for the loss / accuracy curve
# Corrections make up about this share of an epoch's examples (unless --feedback-repeat says):
# 300 of them against 50-60k MNIST images would otherwise be 0.5% of the gradient, and barely move it.
FEEDBACK_SHARE = 0.05
MAX_FEEDBACK_REPEAT = 100


@dataclass
class TrainResult:
    net: Network
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    train_size: int = 0
    validation_size: int = 0
    feedback_repeat: int = 0  # how many times each correction was in every epoch (0: none given)


def feedback_repeat(config: Config, n_mnist: int, n_feedback: int) -> int:
    """Copies of each correction per epoch: the configured number, else enough for the corrections
    to be FEEDBACK_SHARE of the examples, at most MAX_FEEDBACK_REPEAT (a handful of records
    repeated thousands of times would be learnt by heart)."""
    if n_feedback == 0:
        return 0
    if config.feedback_repeat is not None:
        return config.feedback_repeat
    wanted = FEEDBACK_SHARE / (1 - FEEDBACK_SHARE) * n_mnist / n_feedback
    return int(min(MAX_FEEDBACK_REPEAT, max(1, round(wanted))))


def split(images: np.ndarray, labels: np.ndarray, config: Config) -> tuple[tuple, tuple]:
    """(train_images, train_labels), (val_images, val_labels) from the 60k training set."""
    n_val = min(config.validation_size, len(images) - 1)
    cut = len(images) - n_val
    train = images[:cut], labels[:cut]
    if config.train_limit is not None:
        train = train[0][: config.train_limit], train[1][: config.train_limit]
    return train, (images[cut:], labels[cut:])


def score(net: Network, x_rows: np.ndarray, labels: np.ndarray, batch: int = 10_000) -> tuple[float, float]:
    """(mean cost per example, accuracy) of net on rows x, in chunks to bound memory."""
    cost, correct = 0.0, 0
    for i in range(0, len(labels), batch):
        a = feedforward(net, x_rows[i : i + batch].T)
        y = one_hot(labels[i : i + batch], dtype=a.dtype)
        cost += COSTS[net.cost].fn(a, y, net.activations[-1])
        correct += int(np.sum(np.argmax(a, axis=0) == labels[i : i + batch]))
    n = max(len(labels), 1)
    return cost / n, correct / n


def _with_ones(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows [x | 1]: the constant input that multiplies the bias column of the fused parameters."""
    out = np.empty((len(x), x.shape[1] + 1), dtype)
    out[:, :-1] = x
    out[:, -1] = 1
    return out


def train(
    config: Config,
    images: np.ndarray,
    labels: np.ndarray,
    progress: bool = True,
    log: Callable[[str], None] = print,
    corrections: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    """Train on the 60k training images (uint8, (m, 28, 28)) per config; returns the net and curves.

    `corrections` (images 0..255, labels), the training part of the stored feedback, join the
    training images, each `feedback_repeat` times (shifted afresh each time, like any image)."""
    config.check()
    dtype = np.dtype(config.dtype)
    rng = np.random.default_rng(config.seed)
    (tr_images, tr_labels), (va_images, va_labels) = split(images, labels, config)
    repeat = feedback_repeat(config, len(tr_labels), 0 if corrections is None else len(corrections[1]))
    if repeat:
        assert corrections is not None
        extra = np.clip(np.rint(corrections[0]), 0, 255).astype(tr_images.dtype)
        tr_images = np.concatenate([tr_images, np.repeat(extra, repeat, axis=0)])
        tr_labels = np.concatenate([tr_labels, np.repeat(corrections[1], repeat)])
        k = len(corrections[1])
        log(f"{k} corrections x {repeat} = {k * repeat} of the {len(tr_labels)} examples of an epoch")
    n, m = len(tr_labels), config.batch_size

    net = new_network(config.sizes, config.activations, config.cost, rng, config.init, dtype.type)
    engine = FusedSGD(net, config)

    base = _with_ones(to_vectors(tr_images), dtype)  # unshifted inputs (+ a column of ones)
    xs = np.empty_like(base) if config.shift else base  # shifted copies, refilled each epoch
    targets = np.ascontiguousarray(one_hot(tr_labels, dtype=dtype.type).T)  # rows, shuffled like x
    ys = np.empty_like(targets)
    if config.shift:
        padded = augment.pad(tr_images, config.shift)
        shifted = np.empty_like(tr_images)
    va_x = to_vectors(va_images)
    mon = slice(0, min(MONITOR_SIZE, n))
    mon_x, mon_labels = to_vectors(tr_images[mon]), tr_labels[mon]

    result = TrainResult(net, train_size=n, validation_size=len(va_labels), feedback_repeat=repeat)
    steps_per_epoch = -(-n // m)
    total_steps = steps_per_epoch * config.epochs
    step = 0
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        if config.shift:
            augment.shift(padded, config.shift, order, rng, out=shifted)
            xs[:, :-1] = to_vectors(shifted)
            xs[:, -1] = 1
        np.take(targets, order, axis=0, out=ys)
        lr = learning_rate(config, step, total_steps)
        bar = tqdm(
            range(0, n, m),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not progress,
        )
        for i in bar:
            if config.lr_schedule != "constant":
                lr = learning_rate(config, step, total_steps)
            # Unshifted data is gathered batch by batch: copying the whole shuffled
            # epoch first cost ~20% of a reference-preset epoch.
            x = xs[i : i + m] if config.shift else base[order[i : i + m]]
            engine.step(x, ys[i : i + m].T, lr)
            step += 1
        train_seconds = time.perf_counter() - t0

        net = engine.network()
        if not np.all([np.all(np.isfinite(w)) for w in net.weights]):
            raise FloatingPointError(f"weights diverged to inf/nan in epoch {epoch}; lower the learning rate")
        loss, train_acc = score(net, mon_x, mon_labels)
        val_acc = score(net, va_x, va_labels)[1] if len(va_labels) else None
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss,
            "train_accuracy": train_acc,
            "validation_accuracy": val_acc,
            "seconds": train_seconds,
        }
        result.history.append(row)
        val_text = f"{val_acc:.4f}" if val_acc is not None else "n/a"
        log(
            f"epoch {epoch:3d}/{config.epochs}  loss {loss:.4f}  train acc {train_acc:.4f}  "
            f"val acc {val_text}  lr {lr:.4g}  {train_seconds:.2f}s"
        )
    result.net = engine.network()
    result.seconds = time.perf_counter() - started
    return result

"""The training loop: reproducible to the bit, learns real MNIST, and augments correctly."""

from __future__ import annotations

import numpy as np
import pytest

from core.network import predict
from core.preprocess import to_vectors
from trainer import augment
from trainer.data import load_mnist
from trainer.evaluate import metrics
from trainer.presets import make_config
from trainer.train import split, train


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_mnist(data_dir, download=False)


def _weights(net):
    return [a.tobytes() for a in net.weights + net.biases]


def _small(rng_seed: int, n: int = 1200):
    rng = np.random.default_rng(rng_seed)
    return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("preset", ["seed", "best"])
def test_same_seed_gives_bit_identical_weights(preset):
    images, labels = _small(0)
    config = make_config(preset, epochs=2, sizes=(784, 48, 10), validation_size=200, seed=7)
    a = train(config, images, labels, progress=False, log=lambda s: None)
    b = train(config, images, labels, progress=False, log=lambda s: None)
    assert _weights(a.net) == _weights(b.net)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    c = train(make_config(preset, epochs=2, sizes=(784, 48, 10), validation_size=200, seed=8), images, labels,
              progress=False, log=lambda s: None)  # fmt: skip
    assert _weights(a.net) != _weights(c.net)


def test_validation_images_are_held_out_and_limit_applies():
    images, labels = _small(1, 100)
    (tr_x, _), (va_x, _) = split(images, labels, make_config("seed", validation_size=30, train_limit=50))
    assert len(tr_x) == 50 and len(va_x) == 30
    np.testing.assert_array_equal(va_x, images[70:])  # the last images, never the training ones
    np.testing.assert_array_equal(tr_x, images[:50])


def test_short_run_on_real_mnist_clearly_beats_chance(mnist):
    lines = []
    config = make_config(
        "best", epochs=2, sizes=(784, 100, 10), shift=0, train_limit=4000, validation_size=2000
    )
    result = train(config, mnist.train_images, mnist.train_labels, progress=False, log=lines.append)
    assert len(lines) == 2 and "val acc" in lines[0] and "loss" in lines[0]
    assert result.train_size == 4000 and result.validation_size == 2000
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["validation_accuracy"] > 0.85
    test = metrics(result.net, mnist.test_images[:5000], mnist.test_labels[:5000])
    assert test["accuracy"] > 0.85  # chance is 0.10
    cm = np.array(test["confusion_matrix"])
    assert cm.sum() == 5000 and np.trace(cm) == round(test["accuracy"] * 5000)


def test_seed_preset_learns_with_the_reference_recipe(mnist):
    config = make_config("seed", epochs=1, train_limit=12000, validation_size=1000)
    result = train(config, mnist.train_images, mnist.train_labels, progress=False, log=lambda s: None)
    x = to_vectors(mnist.test_images[:2000])
    assert np.mean(predict(result.net, x) == mnist.test_labels[:2000]) > 0.6


def _reference_shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_shifts_are_translations_within_k_pixels():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (400, 28, 28)).astype(np.uint8)  # no zeros: every shift is distinguishable
    k = 2
    order = rng.permutation(len(images))
    out = np.empty_like(images)
    augment.shift(augment.pad(images, k), k, order, np.random.default_rng(1), out)
    seen = set()
    for i, src in enumerate(order):
        matches = [
            (dy, dx)
            for dy in range(-k, k + 1)
            for dx in range(-k, k + 1)
            if np.array_equal(out[i], _reference_shift(images[src], dy, dx))
        ]
        assert len(matches) == 1, f"output {i} is not a ±{k} px shift of image {src}"
        seen.add(matches[0])
    assert len(seen) == (2 * k + 1) ** 2  # every offset is drawn
    augment.shift(augment.pad(images, 0), 0, order, rng, out)
    np.testing.assert_array_equal(out, images[order])  # k = 0 is just the shuffle

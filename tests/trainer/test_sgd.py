"""The fused training step must do exactly what core.network.backprop and the textbook updates say."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core import network as nw
from tests.core.test_network import PAIRINGS
from trainer.presets import Config
from trainer.sgd import FusedSGD, learning_rate


def _setup(hidden: str, output: str, cost: str, m: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    net = nw.new_network([784, 7, 6, 10], [hidden, hidden, output], cost, rng, "scaled", np.float64)
    batches = []
    for _ in range(3):
        x = rng.random((784, m))
        y = nw.one_hot(rng.integers(0, 10, m), dtype=np.float64)
        rows = np.ascontiguousarray(np.concatenate([x.T, np.ones((m, 1))], axis=1))
        batches.append((x, y, rows))
    return net, batches


def _params(net: nw.Network) -> list[np.ndarray]:
    return list(net.weights) + list(net.biases)


@pytest.mark.parametrize(("hidden", "output", "cost"), PAIRINGS)
def test_sgd_step_is_the_reference_update(hidden, output, cost):
    """W <- W - (η/m) Σ ∂C/∂W with the gradients of core.network.backprop, for every pairing."""
    net, batches = _setup(hidden, output, cost)
    engine = FusedSGD(net, Config(optimizer="sgd", dtype="float64"))
    lr = 0.7
    for x, y, rows in batches:
        gw, gb = nw.backprop(net, x, y)
        m = x.shape[1]
        net = net.with_params(
            [w - lr / m * g for w, g in zip(net.weights, gw, strict=True)],
            [b - lr / m * g for b, g in zip(net.biases, gb, strict=True)],
        )
        engine.step(rows, y, lr)
        for got, want in zip(_params(engine.network()), _params(net), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_partial_last_batch_uses_its_own_size():
    net, batches = _setup("sigmoid", "sigmoid", "quadratic", m=5)
    engine = FusedSGD(net, Config(dtype="float64"))
    x, y, rows = batches[0]
    engine.step(rows, y, 3.0)  # m = 5
    engine.step(rows[:2], y[:, :2], 3.0)  # the smaller remainder batch
    gw, gb = nw.backprop(net, x, y)
    after_first = [p - 3.0 / 5 * g for p, g in zip(_params(net), list(gw) + list(gb), strict=True)]
    net1 = net.with_params(after_first[:3], after_first[3:])
    gw, gb = nw.backprop(net1, x[:, :2], y[:, :2])
    want = [p - 3.0 / 2 * g for p, g in zip(_params(net1), list(gw) + list(gb), strict=True)]
    for got, w in zip(_params(engine.network()), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-12)


def test_momentum_and_weight_decay_follow_their_formulas():
    """v <- μv - (η/m)g ; W <- (1 - ηλ)W + v (biases not decayed)."""
    net, batches = _setup("relu", "softmax", "cross_entropy")
    mu, lam, lr = 0.9, 0.01, 0.2
    engine = FusedSGD(net, Config(optimizer="momentum", momentum=mu, weight_decay=lam, dtype="float64"))
    vw = [np.zeros_like(w) for w in net.weights]
    vb = [np.zeros_like(b) for b in net.biases]
    for x, y, rows in batches:
        gw, gb = nw.backprop(net, x, y)
        m = x.shape[1]
        vw = [mu * v - lr / m * g for v, g in zip(vw, gw, strict=True)]
        vb = [mu * v - lr / m * g for v, g in zip(vb, gb, strict=True)]
        net = net.with_params(
            [(1 - lr * lam) * w + v for w, v in zip(net.weights, vw, strict=True)],
            [b + v for b, v in zip(net.biases, vb, strict=True)],
        )
        engine.step(rows, y, lr)
    for got, want in zip(_params(engine.network()), _params(net), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_adam_follows_kingma_and_ba():
    net, batches = _setup("tanh", "softmax", "cross_entropy")
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    engine = FusedSGD(net, Config(optimizer="adam", beta1=b1, beta2=b2, adam_eps=eps, dtype="float64"))
    params = _params(net)
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    for t, (x, y, rows) in enumerate(batches, start=1):
        gw, gb = nw.backprop(net, x, y)
        grads = [g / x.shape[1] for g in list(gw) + list(gb)]
        m1 = [b1 * a + (1 - b1) * g for a, g in zip(m1, grads, strict=True)]
        m2 = [b2 * a + (1 - b2) * g * g for a, g in zip(m2, grads, strict=True)]
        step = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        params = [p - step * a / (np.sqrt(v) + eps) for p, a, v in zip(params, m1, m2, strict=True)]
        net = net.with_params(params[:3], params[3:])
        engine.step(rows, y, lr)
    for got, want in zip(_params(engine.network()), params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_float32_path_stays_close_to_float64_backprop():
    net, batches = _setup("relu", "softmax", "cross_entropy")
    net32 = net.with_params(
        [w.astype(np.float32) for w in net.weights], [b.astype(np.float32) for b in net.biases]
    )
    engine = FusedSGD(net32, Config(dtype="float32"))
    x, y, rows = batches[0]
    engine.step(rows.astype(np.float32), y.astype(np.float32), 0.5)
    gw, gb = nw.backprop(net, x, y)
    want = [p - 0.5 / 5 * g for p, g in zip(_params(net), list(gw) + list(gb), strict=True)]
    for got, w in zip(_params(engine.network()), want, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-5)


def test_learning_rate_schedules():
    c = Config(lr=0.1, epochs=10)
    assert learning_rate(c, 0, 100) == learning_rate(c, 99, 100) == 0.1
    cos = dataclasses.replace(c, lr_schedule="cosine", lr_min=0.001)
    assert learning_rate(cos, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cos, 99, 100) == pytest.approx(0.001)
    assert learning_rate(cos, 30, 100) > learning_rate(cos, 60, 100)
    step = dataclasses.replace(c, lr_schedule="step", lr_step_epochs=3, lr_gamma=0.5)
    assert learning_rate(step, 29, 100) == pytest.approx(0.1)  # epoch 2 (10 steps per epoch)
    assert learning_rate(step, 30, 100) == pytest.approx(0.05)  # epoch 3
    assert learning_rate(step, 99, 100) == pytest.approx(0.0125)  # epoch 9

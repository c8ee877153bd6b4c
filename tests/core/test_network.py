"""core.network: backprop against finite differences, the worked example, batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from core import network as nw

HIDDEN = ("sigmoid", "tanh", "relu")
OUTPUT = ("sigmoid", "tanh", "relu", "softmax")
PAIRINGS = [
    (h, o, c)
    for h, o, c in itertools.product(HIDDEN, OUTPUT, ("quadratic", "cross_entropy"))
    if not (c == "cross_entropy" and o not in ("sigmoid", "softmax"))
]


def _net(hidden: str, output: str, cost: str, seed: int = 0) -> nw.Network:
    rng = np.random.default_rng(seed)
    return nw.new_network([5, 4, 3, 3], [hidden, hidden, output], cost, rng, "scaled", np.float64)


def _batch(seed: int, m: int = 4, n_in: int = 5, n_out: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_in, m))
    y = nw.one_hot(rng.integers(0, n_out, m), n_out, np.float64)
    return x, y


@pytest.mark.parametrize(("hidden", "output", "cost"), PAIRINGS)
def test_backprop_matches_finite_differences(hidden, output, cost):
    net = _net(hidden, output, cost)
    x, y = _batch(1)
    grad_w, grad_b = nw.backprop(net, x, y)
    eps = 1e-6
    for kind, grads in (("w", grad_w), ("b", grad_b)):
        for layer, grad in enumerate(grads):
            numeric = np.zeros_like(grad)
            for idx in np.ndindex(grad.shape):
                params = [list(net.weights), list(net.biases)]
                values = []
                for sign in (1, -1):
                    p = params[0 if kind == "w" else 1][layer].copy()
                    p[idx] += sign * eps
                    ws = [p if (kind == "w" and i == layer) else w for i, w in enumerate(net.weights)]
                    bs = [p if (kind == "b" and i == layer) else b for i, b in enumerate(net.biases)]
                    values.append(nw.total_cost(net.with_params(ws, bs), x, y))
                numeric[idx] = (values[0] - values[1]) / (2 * eps)
            err = np.abs(numeric - grad).max() / max(1e-8, np.abs(numeric).max() + np.abs(grad).max())
            assert err < 1e-6, f"{kind}{layer + 1}: relative error {err:.2e}"
            assert np.abs(grad).max() > 0 or kind == "b", "a vanishing gradient would pass trivially"


def test_worked_example_one_sigmoid_neuron():
    """w = (2, -3), b = -3, x = (-1, -2), y = 1, quadratic cost (the derivation's example)."""
    w = np.array([[2.0, -3.0]])
    b = np.array([[-3.0]])
    net = nw.Network((2, 1), ("sigmoid",), "quadratic", (w,), (b,))
    x = np.array([[-1.0], [-2.0]])
    y = np.array([[1.0]])
    a = nw.feedforward(net, x)
    assert a[0, 0] == pytest.approx(0.731, abs=1e-3)
    (gw,), (gb,) = nw.backprop(net, x, y)
    assert gw[0, 0] == pytest.approx(0.053, abs=1e-3)
    assert gw[0, 1] == pytest.approx(0.106, abs=1e-3)
    assert gb[0, 0] == pytest.approx(-0.053, abs=1e-3)
    stepped = net.with_params([w - 1.0 * gw], [b - 1.0 * gb])
    assert nw.feedforward(stepped, x)[0, 0] == pytest.approx(0.79, abs=5e-3)
    assert nw.feedforward(stepped, x)[0, 0] > a[0, 0]  # the step moved the output toward y


@pytest.mark.parametrize(("hidden", "output", "cost"), PAIRINGS)
def test_batched_gradient_is_sum_of_per_example_gradients(hidden, output, cost):
    net = _net(hidden, output, cost, seed=2)
    x, y = _batch(3, m=7)
    gw, gb = nw.backprop(net, x, y)
    sw = [np.zeros_like(w) for w in gw]
    sb = [np.zeros_like(b) for b in gb]
    for i in range(x.shape[1]):
        ew, eb = nw.backprop(net, x[:, [i]], y[:, [i]])
        sw = [s + e for s, e in zip(sw, ew, strict=True)]
        sb = [s + e for s, e in zip(sb, eb, strict=True)]
    for got, want in zip(gw + gb, sw + sb, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_probabilities_rows_sum_to_one_and_predict_is_argmax():
    rng = np.random.default_rng(4)
    for output in ("softmax", "sigmoid"):
        net = nw.new_network([784, 16, 10], ["relu", output], "cross_entropy", rng, "he")
        x = rng.random((6, 784)).astype(np.float32)
        p = nw.probabilities(net, x)
        assert p.shape == (6, 10)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(nw.predict(net, x), p.argmax(axis=1))


def test_bad_architectures_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="activation"):
        nw.new_network([4, 3, 2], ["softmax", "sigmoid"], "quadratic", rng)
    with pytest.raises(ValueError, match="cross_entropy"):
        nw.new_network([4, 2], ["relu"], "cross_entropy", rng)
    with pytest.raises(ValueError, match="one activation per"):
        nw.new_network([4, 3, 2], ["sigmoid"], "quadratic", rng)


# --- ∂ log p_k / ∂x: the saliency /explain serves -----------------------------------------------


def _numeric_log_prob_gradient(net: nw.Network, x: np.ndarray, k: np.ndarray, eps: float = 1e-6):
    """Central differences of log probabilities(net, x)[i, k_i], one input coordinate at a time."""
    m, n = x.shape
    out = np.zeros_like(x)
    step = np.eye(n) * eps
    for i in range(m):
        plus = nw.probabilities(net, x[i] + step)[:, k[i]]
        minus = nw.probabilities(net, x[i] - step)[:, k[i]]
        out[i] = (np.log(plus) - np.log(minus)) / (2 * eps)
    return out


def _relative_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    return float(np.abs(numeric - analytic).max() / max(1e-8, np.abs(numeric).max() + np.abs(analytic).max()))


@pytest.mark.parametrize(("hidden", "output"), list(itertools.product(HIDDEN, OUTPUT)))
def test_log_prob_input_gradient_matches_finite_differences(hidden, output):
    net = _net(hidden, output, "quadratic", seed=6)  # the cost plays no part in log p_k
    x = np.random.default_rng(7).standard_normal((8, 5))
    if output in ("softmax", "sigmoid"):  # p_k > 0 for every k: explain any class, not only the winner
        k = np.random.default_rng(8).integers(0, 3, len(x))
    else:
        # relu/tanh outputs give p_k = 0 where a_k <= 0 (log p_k has no derivative there): explain
        # the winner, with output biases raised so that several outputs are positive and p is not
        # one-hot (a one-hot p has a flat log p_k, so a zero gradient would pass trivially).
        net = net.with_params(net.weights, [*net.biases[:-1], net.biases[-1] + 1.0])
        p = nw.probabilities(net, x)
        assert ((p > 0).sum(axis=1) >= 2).all()
        k = p.argmax(axis=1)
    analytic = nw.log_prob_input_gradient(net, x, k)
    assert analytic.shape == x.shape
    numeric = _numeric_log_prob_gradient(net, x, k)
    assert _relative_error(numeric, analytic) < 1e-6
    assert np.abs(analytic).max() > 1e-3, "a vanishing gradient would pass trivially"


def test_log_prob_input_gradient_at_mnist_shape():
    """784-30-10 sigmoid + softmax (tests.helpers.random_net's shape), in float64 for the differences."""
    rng = np.random.default_rng(9)
    net = nw.new_network([784, 30, 10], ["sigmoid", "softmax"], "cross_entropy", rng, "scaled", np.float64)
    x = rng.random((2, 784))
    k = np.array([3, nw.probabilities(net, x[1:])[0].argmax()])
    analytic = nw.log_prob_input_gradient(net, x, k)
    assert _relative_error(_numeric_log_prob_gradient(net, x, k), analytic) < 1e-6
    # Another class explains differently: the class is not ignored.
    other = nw.log_prob_input_gradient(net, x, (k + 1) % 10)
    assert np.abs(other - analytic).max() > 1e-3


def test_log_prob_input_gradient_keeps_float32_and_wants_one_class_per_row():
    rng = np.random.default_rng(10)
    net = nw.new_network([784, 16, 10], ["relu", "softmax"], "cross_entropy", rng, "he")
    x = rng.random((3, 784)).astype(np.float32)
    assert nw.log_prob_input_gradient(net, x, np.array([0, 1, 2])).dtype == np.float32
    with pytest.raises(ValueError, match="one class per row"):
        nw.log_prob_input_gradient(net, x, np.array([0, 1]))

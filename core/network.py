"""A fully connected network, with backpropagation written out by hand.

The notation is Nielsen's. Layer l computes

    z^l = W^l a^{l-1} + b^l,        a^l = σ(z^l),

with W^l of shape (n_l, n_{l-1}) and b^l of shape (n_l, 1). A minibatch of m
examples is the matrix whose m *columns* are the examples, so each layer is
one matrix product for the whole batch and the formulas keep their textbook
shape. Backpropagation is the four equations:

    δ^L = ∇_a C ⊙ σ'(z^L)
    δ^l = ((W^{l+1})ᵀ δ^{l+1}) ⊙ σ'(z^l)
    ∂C/∂b^l = δ^l
    ∂C/∂W^l = δ^l (a^{l-1})ᵀ

Summed over the columns of a batch, the last two become row sums and a single
matrix product. One step further, δ^0 = (W^1)ᵀ δ^1 is the gradient with
respect to the input itself: started from ∂ log p_k / ∂z^L rather than ∂C/∂z^L,
it says which pixels made the network say k (`log_prob_input_gradient`, what
/explain serves). Everything here is a pure function of its arguments; the
trainer and the service share `feedforward`, so what is served is exactly
what was evaluated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Array = np.ndarray


# --- activations -------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """σ, and ∂C/∂z from ∂C/∂a through it (the Jacobian of σ, transposed, times ∂C/∂a).

    Each comes twice: as pure functions, the reference maths that backprop and
    the service use, and in place into preallocated buffers, for the fused step
    of `trainer.sgd`; the tests check that both give the same updates. The
    derivatives are written in terms of a = σ(z) where that is the cheap form
    (σ' = a(1 - a), tanh' = 1 - a²). `elementwise` is False only for softmax,
    whose Jacobian is not diagonal; such an activation may only be the output.
    Adding an activation means adding one entry to ACTIVATIONS.
    """

    name: str
    fn: Callable[[Array], Array]  # z -> σ(z)
    vjp: Callable[[Array, Array, Array], Array]  # (z, a, ∂C/∂a) -> ∂C/∂z
    fn_inplace: Callable[[Array, Array], None]  # (z, row): z <- σ(z); row is (1, m) scratch
    vjp_inplace: Callable[[Array, Array, Array, Array, Array], None]  # (a, δ, tmp, mask, row): δ <- ∂C/∂z
    elementwise: bool = True


def _sigmoid(z: Array) -> Array:
    # 1/(1+e^{-z}) overflows for z << 0; the tanh form is exact and stable.
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _sigmoid_inplace(z: Array, row: Array) -> None:
    z *= 0.5
    np.tanh(z, out=z)
    z += 1.0
    z *= 0.5


def _sigmoid_vjp_inplace(a: Array, delta: Array, tmp: Array, mask: Array, row: Array) -> None:
    np.subtract(1.0, a, out=tmp)
    tmp *= a
    delta *= tmp


def _tanh_vjp_inplace(a: Array, delta: Array, tmp: Array, mask: Array, row: Array) -> None:
    np.multiply(a, a, out=tmp)
    np.subtract(1.0, tmp, out=tmp)
    delta *= tmp


def _relu_vjp_inplace(a: Array, delta: Array, tmp: Array, mask: Array, row: Array) -> None:
    np.greater(a, 0.0, out=mask)  # a > 0 exactly where z > 0
    delta *= mask


def _softmax(z: Array) -> Array:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    e /= e.sum(axis=0, keepdims=True)  # in place: e is ours, and the bits are those of e / sum
    return e


def _softmax_vjp(z: Array, a: Array, grad_a: Array) -> Array:
    # J = diag(a) - a aᵀ per column, so Jᵀg = a ⊙ (g - aᵀg).
    return a * (grad_a - np.sum(a * grad_a, axis=0, keepdims=True))


def _softmax_inplace(z: Array, row: Array) -> None:
    np.max(z, axis=0, keepdims=True, out=row)
    z -= row
    np.exp(z, out=z)
    np.sum(z, axis=0, keepdims=True, out=row)
    z /= row


def _softmax_vjp_inplace(a: Array, delta: Array, tmp: Array, mask: Array, row: Array) -> None:
    np.multiply(a, delta, out=tmp)
    np.sum(tmp, axis=0, keepdims=True, out=row)
    delta -= row
    delta *= a


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(
        "sigmoid",
        fn=_sigmoid,
        vjp=lambda z, a, g: g * (a * (1.0 - a)),
        fn_inplace=_sigmoid_inplace,
        vjp_inplace=_sigmoid_vjp_inplace,
    ),
    "tanh": Activation(
        "tanh",
        fn=np.tanh,
        vjp=lambda z, a, g: g * (1.0 - a * a),
        fn_inplace=lambda z, row: np.tanh(z, out=z),
        vjp_inplace=_tanh_vjp_inplace,
    ),
    "relu": Activation(
        "relu",
        fn=lambda z: np.maximum(z, 0.0),
        vjp=lambda z, a, g: g * (z > 0).astype(z.dtype),
        fn_inplace=lambda z, row: np.maximum(z, 0.0, out=z),
        vjp_inplace=_relu_vjp_inplace,
    ),
    "softmax": Activation(
        "softmax",
        fn=_softmax,
        vjp=_softmax_vjp,
        fn_inplace=_softmax_inplace,
        vjp_inplace=_softmax_vjp_inplace,
        elementwise=False,
    ),
}
HIDDEN_ACTIVATIONS = tuple(name for name, act in ACTIVATIONS.items() if act.elementwise)
OUTPUT_ACTIVATIONS = tuple(ACTIVATIONS)


# --- costs -------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """C(a, y) summed over the columns of a batch, and ∇_a C per column.

    `grad_a` is None for the cross-entropy: with the sigmoid or softmax output
    it is paired with, σ' cancels and δ^L is a - y, which `output_delta` uses.
    """

    name: str
    fn: Callable[[Array, Array, str], float]
    grad_a: Callable[[Array, Array], Array] | None


def _quadratic(a: Array, y: Array, output: str) -> float:
    return 0.5 * float(np.sum((a - y) ** 2))


def _cross_entropy(a: Array, y: Array, output: str) -> float:
    # Categorical (log-likelihood) for softmax, Bernoulli per unit for sigmoid:
    # for both, ∂C/∂z^L works out to a - y, which is why they are paired.
    with np.errstate(divide="ignore", invalid="ignore"):
        if output == "softmax":
            return float(-np.sum(np.nan_to_num(y * np.log(a))))
        return float(-np.sum(np.nan_to_num(y * np.log(a) + (1 - y) * np.log(1 - a))))


COSTS: dict[str, Cost] = {
    "quadratic": Cost("quadratic", _quadratic, lambda a, y: a - y),
    "cross_entropy": Cost("cross_entropy", _cross_entropy, None),
}


def check_architecture(sizes: Sequence[int], activations: Sequence[str], cost: str) -> None:
    """Reject architectures whose maths is undefined, with a reason a user can act on."""
    if len(sizes) < 2 or any(int(n) < 1 for n in sizes):
        raise ValueError(f"layer sizes must be at least two positive integers, got {list(sizes)}")
    if len(activations) != len(sizes) - 1:
        raise ValueError(
            f"need one activation per non-input layer ({len(sizes) - 1}), got {len(activations)}"
        )
    for i, name in enumerate(activations):
        allowed = OUTPUT_ACTIVATIONS if i == len(activations) - 1 else HIDDEN_ACTIVATIONS
        if name not in allowed:
            raise ValueError(f"activation {name!r} not allowed in layer {i + 1}; choose from {allowed}")
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose from {tuple(COSTS)}")
    if cost == "cross_entropy" and activations[-1] not in ("sigmoid", "softmax"):
        raise ValueError("cross_entropy needs a sigmoid or softmax output layer (it takes log a)")


# --- the network -------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """Architecture plus parameters; immutable so a served model cannot drift."""

    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    cost: str
    weights: tuple[Array, ...]
    biases: tuple[Array, ...]

    def __post_init__(self) -> None:
        check_architecture(self.sizes, self.activations, self.cost)

    def with_params(self, weights: Sequence[Array], biases: Sequence[Array]) -> Network:
        return Network(self.sizes, self.activations, self.cost, tuple(weights), tuple(biases))


def init_params(
    sizes: Sequence[int],
    rng: np.random.Generator,
    scheme: str = "standard_normal",
    dtype: type = np.float32,
) -> tuple[list[Array], list[Array]]:
    """Initial W^l and b^l.

    `standard_normal` is the reference run's N(0, 1) for every weight and
    bias. `scaled` divides weights by sqrt(n_{l-1}) (Nielsen ch. 3), `he`
    by sqrt(n_{l-1}/2) for ReLU; both start biases at zero.
    """
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(sizes):
        w = rng.standard_normal((n_out, n_in))
        if scheme == "standard_normal":
            b = rng.standard_normal((n_out, 1))
        elif scheme in ("scaled", "he"):
            w = w * np.sqrt((2.0 if scheme == "he" else 1.0) / n_in)
            b = np.zeros((n_out, 1))
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")
        weights.append(w.astype(dtype))
        biases.append(b.astype(dtype))
    return weights, biases


def new_network(
    sizes: Sequence[int],
    activations: Sequence[str],
    cost: str,
    rng: np.random.Generator,
    init: str = "standard_normal",
    dtype: type = np.float32,
) -> Network:
    check_architecture(sizes, activations, cost)
    weights, biases = init_params(sizes, rng, init, dtype)
    return Network(tuple(int(n) for n in sizes), tuple(activations), cost, tuple(weights), tuple(biases))


def feedforward(net: Network, a: Array) -> Array:
    """a^L for input columns `a` of shape (n_0, m): the one forward pass."""
    for w, b, name in zip(net.weights, net.biases, net.activations, strict=True):
        z = w @ a
        z += b  # in place: one temporary less per layer, for a single image as for a batch
        a = ACTIVATIONS[name].fn(z)
    return a


def probabilities(net: Network, x: Array) -> Array:
    """Class probabilities, one *row* per example, for inputs x of shape (m, n_0).

    Softmax outputs already sum to 1; other outputs are scaled to sum to 1,
    which keeps the argmax and gives a sigmoid model comparable numbers.
    """
    a = feedforward(net, x.T).T
    if net.activations[-1] == "softmax":
        return a
    a = np.clip(a, 0.0, None)
    total = a.sum(axis=1, keepdims=True)
    uniform = np.full_like(a, 1.0 / a.shape[1])
    return np.divide(a, total, out=uniform, where=total > 0)


def predict(net: Network, x: Array) -> Array:
    """The digit for each row of x."""
    return np.argmax(feedforward(net, x.T), axis=0)


def output_delta(net: Network, z: Array, a: Array, y: Array) -> Array:
    """δ^L = ∇_a C ⊙ σ'(z^L), or a - y where the cross-entropy cancels σ'."""
    grad_a = COSTS[net.cost].grad_a
    if grad_a is None:
        return a - y
    return ACTIVATIONS[net.activations[-1]].vjp(z, a, grad_a(a, y))


def forward_keep(net: Network, x: Array) -> tuple[list[Array], list[Array]]:
    """The forward pass that keeps what the backward pass needs: z^1..z^L and a^0..a^L.

    For input columns x (n_0, m). Separate from `feedforward`, which keeps nothing
    and is what /predict runs.
    """
    activations = [x]
    zs = []
    a = x
    for w, b, name in zip(net.weights, net.biases, net.activations, strict=True):
        z = w @ a + b
        a = ACTIVATIONS[name].fn(z)
        zs.append(z)
        activations.append(a)
    return zs, activations


def backward_deltas(net: Network, zs: list[Array], activations: list[Array], delta: Array) -> list[Array]:
    """δ^1..δ^L from δ^L by δ^l = ((W^{l+1})ᵀ δ^{l+1}) ⊙ σ'(z^l), whatever scalar δ^L differentiates."""
    deltas = [delta]
    for l in range(len(net.weights) - 1, 0, -1):  # noqa: E741 - l is the layer index of the derivation
        act = ACTIVATIONS[net.activations[l - 1]]
        delta = act.vjp(zs[l - 1], activations[l], net.weights[l].T @ delta)
        deltas.append(delta)
    return deltas[::-1]


def backprop(net: Network, x: Array, y: Array) -> tuple[list[Array], list[Array]]:
    """∂C/∂W^l and ∂C/∂b^l, summed over the columns of x (n_0, m) and y (n_L, m).

    Summing (not averaging) keeps the update rule the reference one:
    W -> W - (η/m) Σ_x ∂C_x/∂W.
    """
    zs, activations = forward_keep(net, x)
    deltas = backward_deltas(net, zs, activations, output_delta(net, zs[-1], activations[-1], y))
    grad_b = [delta.sum(axis=1, keepdims=True) for delta in deltas]
    grad_w = [delta @ a.T for delta, a in zip(deltas, activations[:-1], strict=True)]
    return grad_w, grad_b


def log_prob_delta(net: Network, z: Array, a: Array, k: Array) -> Array:
    """∂ log p_k / ∂z^L per column, for the output layer's z and a (n_L, m) and classes k (m,).

    p is what `probabilities` returns. For softmax, p = a and the derivative
    is onehot_k - p. Any other output is normalised, p = a⁺ / Σ a⁺ with
    a⁺ = max(a, 0), so ∂ log p_k / ∂a_j = [a_j > 0] (δ_jk / a_k - 1 / Σ a⁺),
    taken back through σ. Where p_k = 0 (a_k ≤ 0: log p_k is -∞ and flat) the
    column is 0.
    """
    cols = np.arange(a.shape[1])
    if net.activations[-1] == "softmax":
        delta = -a
        delta[k, cols] += 1.0
        return delta
    pos = a > 0
    total = np.sum(a, axis=0, keepdims=True, where=pos)
    a_k = a[k, cols]
    inv_total = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    inv_a_k = np.divide(1.0, a_k, out=np.zeros_like(a_k), where=a_k > 0)
    grad_a = np.where(pos, -inv_total, 0.0)
    grad_a[k, cols] += inv_a_k
    grad_a[:, a_k <= 0] = 0.0
    return ACTIVATIONS[net.activations[-1]].vjp(z, a, grad_a)


def log_prob_input_gradient(net: Network, x: Array, k: Array) -> Array:
    """∂ log p_k / ∂x for input *rows* x (m, n_0) and one class k per row: shape (m, n_0).

    Which inputs made the network say k: the same backward pass as `backprop`,
    started from ∂ log p_k / ∂z^L instead of ∂C/∂z^L and taken one step
    further, δ^0 = (W^1)ᵀ δ^1, since x plays the part of a^0. The gradient is
    with respect to x as the network sees it (to_vectors' [0, 1] scale).
    """
    k = np.asarray(k, dtype=np.intp).reshape(-1)
    if k.shape[0] != x.shape[0]:
        raise ValueError(f"need one class per row: {x.shape[0]} rows, {k.shape[0]} classes")
    zs, activations = forward_keep(net, x.T)
    deltas = backward_deltas(net, zs, activations, log_prob_delta(net, zs[-1], activations[-1], k))
    return (net.weights[0].T @ deltas[0]).T


def total_cost(net: Network, x: Array, y: Array) -> float:
    """C summed over the columns of x; what the gradient check differentiates."""
    return COSTS[net.cost].fn(feedforward(net, x), y, net.activations[-1])


def one_hot(labels: Array, n_classes: int = 10, dtype: type = np.float32) -> Array:
    """Labels as columns of the identity, shape (n_classes, m)."""
    y = np.zeros((n_classes, len(labels)), dtype=dtype)
    y[labels, np.arange(len(labels))] = 1
    return y

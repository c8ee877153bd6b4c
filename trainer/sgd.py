"""Minibatch gradient descent: the fast path of backprop, with SGD, momentum and Adam.

This is `core.network.backprop` followed by the update, fused and written for
speed, because at the reference minibatch of 16 the matrix work is tiny and
the time goes into numpy calls and temporary arrays. Three things make it fast:

* Each layer keeps [W^l | b^l] as one matrix P^l of shape (n_l, n_{l-1} + 1),
  and each activation buffer has a constant last row of ones, so
  z^l = P^l [a^{l-1}; 1] is one product with the bias included, and
  δ^l [a^{l-1}; 1]ᵀ gives ∂C/∂W^l and ∂C/∂b^l at once.
* Every intermediate lives in a buffer allocated once per batch size, and
  every operation writes with `out=` or in place.
* The output delta is multiplied by -η/m first; the gradients are linear in
  it, so they come out already scaled and SGD is one in-place add per layer.

The maths is that of `core.network` (the tests check the updates against
`core.network.backprop` for every activation and cost).
"""

from __future__ import annotations

import math

import numpy as np

from core.network import ACTIVATIONS, COSTS, Network
from trainer.presets import Config

Array = np.ndarray


def learning_rate(config: Config, step: int, total_steps: int) -> float:
    """η at a given step (0-based) of `total_steps`, per config.lr_schedule."""
    if config.lr_schedule == "cosine":
        frac = step / max(total_steps - 1, 1)
        return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1.0 + math.cos(math.pi * frac))
    if config.lr_schedule == "step":
        steps_per_epoch = max(total_steps // config.epochs, 1)
        return config.lr * config.lr_gamma ** ((step // steps_per_epoch) // config.lr_step_epochs)
    return config.lr


class _Buffers:
    """Every array one step needs, for one batch size m."""

    def __init__(self, sizes: tuple[int, ...], m: int, dtype: np.dtype) -> None:
        n_layers = len(sizes) - 1
        # Hidden outputs carry a row of ones so the next product adds the bias.
        self.a = [np.ones((n + 1, m), dtype) for n in sizes[1:-1]] + [np.empty((sizes[-1], m), dtype)]
        self.delta = [np.empty((n, m), dtype) for n in sizes[1:]]
        self.tmp = [np.empty((n, m), dtype) for n in sizes[1:]]
        self.mask = [np.empty((n, m), bool) for n in sizes[1:]]
        self.row = np.empty((1, m), dtype)
        self.views = [self.a[l][: sizes[l + 1]] for l in range(n_layers)]  # noqa: E741


class FusedSGD:
    """Training state (parameters, optimiser moments) and the fused minibatch step."""

    def __init__(self, net: Network, config: Config) -> None:
        self.sizes = net.sizes
        self.activations = net.activations
        self.layer_activations = [ACTIVATIONS[name] for name in net.activations]
        self.cost = net.cost
        self.dtype = net.weights[0].dtype
        self.params = [
            np.ascontiguousarray(np.concatenate([w, b], axis=1), dtype=self.dtype)
            for w, b in zip(net.weights, net.biases, strict=True)
        ]
        self.grads = [np.empty_like(p) for p in self.params]
        self.optimizer = config.optimizer
        self.momentum = config.momentum
        self.beta1, self.beta2, self.eps = config.beta1, config.beta2, config.adam_eps
        self.weight_decay = config.weight_decay
        self.moment1 = [np.zeros_like(p) for p in self.params] if self.optimizer != "sgd" else []
        self.moment2 = [np.zeros_like(p) for p in self.params] if self.optimizer == "adam" else []
        self.scratch = [np.empty_like(p) for p in self.params] if self.optimizer == "adam" else []
        self.steps = 0
        self._buffers: dict[int, _Buffers] = {}

    def network(self) -> Network:
        """The current parameters as an (independent) core Network."""
        weights = tuple(np.ascontiguousarray(p[:, :-1]) for p in self.params)
        biases = tuple(np.ascontiguousarray(p[:, -1:]) for p in self.params)
        return Network(self.sizes, self.activations, self.cost, weights, biases)

    # --- the step ------------------------------------------------------------

    def step(self, x: Array, y: Array, lr: float) -> None:
        """One update from a minibatch.

        x: rows (m, n_0 + 1) whose last column is 1 (the bias input), C-contiguous;
        y: targets as columns (n_L, m), any strides.
        """
        m = x.shape[0]
        buf = self._buffers.get(m)
        if buf is None:
            buf = self._buffers[m] = _Buffers(self.sizes, m, self.dtype)
        params, acts, views = self.params, self.layer_activations, buf.views
        n_layers = len(params)

        # forward: one product per layer, activation in place
        prev = x.T
        for l in range(n_layers):  # noqa: E741
            z = views[l]
            np.matmul(params[l], prev, out=z)
            acts[l].fn_inplace(z, buf.row)
            prev = buf.a[l]

        # δ^L, pre-scaled so the gradients come out as the update
        self.steps += 1
        scale = (1.0 / m) if self.optimizer == "adam" else (-lr / m)
        delta = buf.delta[-1]
        self._output_delta(views[-1], y, delta, buf.tmp[-1], buf.mask[-1], buf.row)
        delta *= scale

        for l in range(n_layers - 1, -1, -1):  # noqa: E741
            grad = self.grads[l]
            np.matmul(delta, x if l == 0 else buf.a[l - 1].T, out=grad)
            if l > 0:
                back = buf.delta[l - 1]
                np.matmul(params[l][:, :-1].T, delta, out=back)
                acts[l - 1].vjp_inplace(views[l - 1], back, buf.tmp[l - 1], buf.mask[l - 1], buf.row)
                delta = back
            self._update(l, grad, lr)

    def _output_delta(self, a: Array, y: Array, out: Array, tmp: Array, mask: Array, row: Array) -> None:
        """δ^L = ∇_a C ⊙ σ'(z^L), or a - y where cross-entropy cancels σ' (as core.network)."""
        np.subtract(a, y, out=out)  # ∇_a C for the quadratic cost; δ^L itself for cross-entropy
        if COSTS[self.cost].grad_a is not None:
            self.layer_activations[-1].vjp_inplace(a, out, tmp, mask, row)

    def _update(self, l: int, grad: Array, lr: float) -> None:  # noqa: E741
        p = self.params[l]
        if self.weight_decay:
            p[:, :-1] *= 1.0 - lr * self.weight_decay  # L2 on weights only, not biases
        if self.optimizer == "sgd":
            p += grad
        elif self.optimizer == "momentum":
            v = self.moment1[l]
            v *= self.momentum
            v += grad
            p += v
        else:  # Adam, Kingma & Ba's "efficient" form with a bias-corrected step size
            b1, b2, t = self.beta1, self.beta2, self.steps
            mom, var, tmp = self.moment1[l], self.moment2[l], self.scratch[l]
            np.subtract(grad, mom, out=tmp)
            tmp *= 1.0 - b1
            mom += tmp
            np.multiply(grad, grad, out=tmp)
            tmp -= var
            tmp *= 1.0 - b2
            var += tmp
            step = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
            np.sqrt(var, out=tmp)
            tmp += self.eps
            np.divide(mom, tmp, out=tmp)
            tmp *= -step
            p += tmp

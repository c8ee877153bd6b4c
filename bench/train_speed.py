"""Training speed of the `seed` preset: this trainer vs the reference per-example loop vs PyTorch.

All three train the same network ([784, 32, 10], sigmoids, quadratic cost,
N(0, 1) init, minibatch 16, η = 3.0, plain SGD) on the same 50k images, in
this one process, one after the other, so they share the machine's state.
It prints the median seconds per epoch of each, the ratios, the test
accuracy each reached, and how far this trainer is from the machine's
arithmetic limit (the epoch's FLOPs at the peak GEMM rate measured here).

    python bench/train_speed.py                 # 3 epochs each (reference: 1), 1 thread
    TRAINER_THREADS=2 python bench/train_speed.py
    python bench/train_speed.py --epochs 5 --reference-epochs 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

from core.threads import pin_blas_threads

# The same BLAS thread count as `python -m trainer` (TRAINER_THREADS, default 1), set before numpy loads;
# PyTorch is then given the same count.
pin_blas_threads(os.environ.get("TRAINER_THREADS", "1"))

import numpy as np  # noqa: E402

from core.network import new_network, one_hot, predict  # noqa: E402
from core.preprocess import to_vectors  # noqa: E402
from trainer.data import load_mnist  # noqa: E402
from trainer.presets import make_config  # noqa: E402
from trainer.train import train  # noqa: E402


def blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)


def peak_gflops(dtype=np.float32, n: int = 1024, repeat: int = 20) -> float:
    """Best-of large GEMM rate: the machine's practical arithmetic ceiling for numpy."""
    a = np.random.default_rng(0).random((n, n)).astype(dtype)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def epoch_flops(sizes: list[int], n: int) -> float:
    """Forward (z = Wa), δ (Wᵀδ, not for the input layer) and ∂C/∂W (δaᵀ): 2 FLOPs per multiply-add."""
    per_example = 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        per_example += 2 * n_in * n_out * (2 if i == 0 else 3)
    return per_example * n


# --- the reference: Nielsen's network.py, one example at a time ---------------


def reference_epochs(x, y, labels_test, x_test, net, epochs, m, eta, seed):
    """A faithful port of network.py's SGD: per-example backprop, gradients summed over the minibatch.

    float64 as in network.py; it starts from the same initial weights as this trainer.
    """
    rng = np.random.default_rng(seed + 1)
    sizes = net.sizes
    biases = [b.astype(np.float64) for b in net.biases]
    weights = [w.astype(np.float64) for w in net.weights]
    data = [(x[i].reshape(-1, 1).astype(np.float64), y[:, [i]].astype(np.float64)) for i in range(len(x))]

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    def backprop(xi, yi):
        nabla_b = [np.zeros(b.shape) for b in biases]
        nabla_w = [np.zeros(w.shape) for w in weights]
        activation, activations, zs = xi, [xi], []
        for b, w in zip(biases, weights, strict=True):
            z = np.dot(w, activation) + b
            zs.append(z)
            activation = sigmoid(z)
            activations.append(activation)
        delta = (activations[-1] - yi) * sigmoid(zs[-1]) * (1 - sigmoid(zs[-1]))
        nabla_b[-1] = delta
        nabla_w[-1] = np.dot(delta, activations[-2].transpose())
        for layer in range(2, len(sizes)):
            sp = sigmoid(zs[-layer]) * (1 - sigmoid(zs[-layer]))
            delta = np.dot(weights[-layer + 1].transpose(), delta) * sp
            nabla_b[-layer] = delta
            nabla_w[-layer] = np.dot(delta, activations[-layer - 1].transpose())
        return nabla_b, nabla_w

    seconds = []
    for _ in range(epochs):
        t = time.perf_counter()
        order = rng.permutation(len(data))
        for k in range(0, len(data), m):
            batch = [data[j] for j in order[k : k + m]]
            nabla_b = [np.zeros(b.shape) for b in biases]
            nabla_w = [np.zeros(w.shape) for w in weights]
            for xi, yi in batch:
                db, dw = backprop(xi, yi)
                nabla_b = [nb + d for nb, d in zip(nabla_b, db, strict=True)]
                nabla_w = [nw + d for nw, d in zip(nabla_w, dw, strict=True)]
            weights = [w - (eta / len(batch)) * nw for w, nw in zip(weights, nabla_w, strict=True)]
            biases = [b - (eta / len(batch)) * nb for b, nb in zip(biases, nabla_b, strict=True)]
        seconds.append(time.perf_counter() - t)
    a = x_test.T.astype(np.float64)
    for b, w in zip(biases, weights, strict=True):
        a = sigmoid(w @ a + b)
    return seconds, float(np.mean(np.argmax(a, axis=0) == labels_test))


# --- the same run in PyTorch ---------------------------------------------------


def torch_epochs(x, labels, x_test, labels_test, net, epochs, m, eta, seed, threads):
    """The same loop in PyTorch (float32, like this trainer), from the same initial weights."""
    import torch

    torch.set_num_threads(threads)
    layers = []
    for w, b in zip(net.weights, net.biases, strict=True):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.astype(np.float32)))
            lin.bias.copy_(torch.from_numpy(b.astype(np.float32).ravel()))
        layers += [lin, torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(one_hot(labels).T))
    rng = np.random.default_rng(seed + 2)
    seconds = []
    for _ in range(epochs):
        t = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(xt)))
        xs, ys = xt[order], yt[order]
        for k in range(0, len(xs), m):
            xb, yb = xs[k : k + m], ys[k : k + m]
            opt.zero_grad(set_to_none=True)
            # C = ½ Σ ||a - y||², averaged over the batch: the same (η/m) Σ ∂C_x update
            loss = 0.5 * ((model(xb) - yb) ** 2).sum() / len(xb)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t)
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return seconds, float(np.mean(pred == labels_test))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="MNIST root (DATA_DIR)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of this trainer and of PyTorch")
    p.add_argument("--reference-epochs", type=int, default=1, help="epochs of the (slow) per-example loop")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    args = p.parse_args(argv)

    data = load_mnist(args.data_dir)
    config = make_config("seed", epochs=args.epochs)
    sizes = list(config.sizes)
    x_all = to_vectors(data.train_images)
    x_train, y_labels = x_all[:50_000], data.train_labels[:50_000]
    x_test, labels_test = to_vectors(data.test_images), data.test_labels
    threads = blas_threads()
    print(
        f"seed preset {sizes}, minibatch {config.batch_size}, η {config.lr}, 50000 images, {threads} threads"
    )

    # the initial network train() draws first from default_rng(seed): all three start from it
    initial = new_network(
        sizes, config.activations, config.cost, np.random.default_rng(config.seed), config.init, np.float64
    )
    rows = []
    result = train(config, data.train_images, data.train_labels, progress=False, log=lambda s: None)
    ours = [h["seconds"] for h in result.history]
    acc = float(np.mean(predict(result.net, x_test) == labels_test))
    rows.append(("this trainer (fused batch)", ours, acc))

    ref_s, ref_acc = reference_epochs(
        x_train, one_hot(y_labels), labels_test, x_test, initial, args.reference_epochs, 16, 3.0, 0
    )
    rows.append(("per-example reference loop", ref_s, ref_acc))

    if not args.no_torch:
        try:
            t_s, t_acc = torch_epochs(
                x_train, y_labels, x_test, labels_test, initial, args.epochs, 16, 3.0, 0, threads
            )
            rows.append((f"PyTorch CPU ({threads} threads)", t_s, t_acc))
        except ImportError:
            print("torch not installed: PyTorch row skipped")

    med = {name: statistics.median(s) for name, s, _ in rows}
    base = med[rows[0][0]]
    print(f"\n{'':30s} {'s/epoch (median)':>17s} {'epochs':>7s} {'test acc':>9s} {'vs this':>8s}")
    for name, s, a in rows:
        print(f"{name:30s} {med[name]:17.3f} {len(s):7d} {a:9.4f} {med[name] / base:7.1f}x")
    gflop = epoch_flops(sizes, 50_000) / 1e9
    peak = peak_gflops(np.dtype(config.dtype).type)
    limit = gflop / peak
    print(f"\nspeed-up over the per-example loop: {med[rows[1][0]] / base:.1f}x (target >= 10x)")
    if len(rows) > 2:
        print(f"speed-up over PyTorch:              {med[rows[2][0]] / base:.1f}x (target >= 2x)")
    print(
        f"arithmetic limit: {gflop:.1f} GFLOP/epoch at the {config.dtype} GEMM peak measured here, "
        f"{peak:.0f} GFLOP/s, "
        f"= {limit:.3f} s/epoch; this trainer takes {base / limit:.1f}x that"
    )
    print("(accuracies after the epochs run here; the full seed preset is 30 epochs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

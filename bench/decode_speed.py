"""Decode time of one 28×28 MNIST digit sent as PNG: the service's PNG fast path vs Pillow's open.

    python bench/decode_speed.py [--data-dir data] [--rounds 9] [--number 2000] [--request-us 900]

`service.imaging.decode` walks a plain PNG's chunks itself and hands the
pixels to Pillow's zlib decoder; any other image takes the generic path,
Pillow's `Image.open` with plugin probing. Both give the
same array. Rounds alternate the two, so noise from other processes hits
both; it prints the median µs per decode of each and what the fast path saves
as a share of a /predict request's CPU time (`--request-us`, about 900 µs
across gunicorn, Flask and the service). A saving under about 3% of that is
within the serving benchmark's noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import timeit
from pathlib import Path

import numpy as np
from PIL import Image

from core import mnist
from core.preprocess import IMAGE_SIDE
from service import imaging

ROOT = Path(__file__).resolve().parent.parent
MAX_PIXELS = 16_000_000  # the service's default MAX_IMAGE_PIXELS


def generic(data: bytes) -> imaging._Probe:
    """The probe of `data` without its plain-PNG shortcut: `_decode` then takes the path of every
    other image, Pillow's `Image.open` with plugin probing (the checks before it are the same)."""
    return dataclasses.replace(imaging._probe(data, MAX_PIXELS), plain=None, data=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--request-us", type=float, default=900.0)
    args = parser.parse_args()

    digit = mnist.read(args.data_dir, "test_images")[0]  # the first test digit
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, "PNG")
    data = buf.getvalue()
    paths = {
        "fast path (imaging.decode)": lambda: imaging.decode(data, MAX_PIXELS),
        "Pillow's Image.open": lambda: imaging._decode(generic(data)),
    }
    outputs = [f() for f in paths.values()]
    assert all(np.array_equal(o, outputs[0]) for o in outputs) and outputs[0].shape == (IMAGE_SIDE,) * 2

    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, f in paths.items():
            times[name].append(timeit.timeit(f, number=args.number) / args.number * 1e6)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"median µs per decode of a {len(data)}-byte 28x28 PNG, {args.rounds} rounds x {args.number}")
    for name, us in med.items():
        print(f"  {name:28s} {us:7.1f}")
    fast, pillow = med.values()
    saved = pillow - fast
    share = saved / args.request_us
    print(f"the fast path saves {saved:.1f} µs: {share:.1%} of a {args.request_us:.0f} µs request")


if __name__ == "__main__":
    main()

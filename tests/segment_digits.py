"""Hollow seven-segment digits, the outlines of a display's segments: strokes unlike any pen's,
a distribution the shipped model (trained on 1990s handwriting) handles badly (about 66% right
against 99% on MNIST's test set), for the tests of learning from corrections.

Each digit is a random instance: slant, stroke width, segment gaps, size and position vary, and
the drawing is dark ink on a light, slightly noisy background at a size unlike 28×28, so it
takes the service's real normalisation (`service.imaging.to_mnist`) like a photo would.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Segments a..g (a top, b top right, c bottom right, d bottom, e bottom left, f top left, g middle).
SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
# Each segment as a line between two corners of the unit box (x right, y down).
_ENDS = {
    "a": ((0, 0), (1, 0)),
    "b": ((1, 0), (1, 0.5)),
    "c": ((1, 0.5), (1, 1)),
    "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)),
    "f": ((0, 0), (0, 0.5)),
    "g": ((0, 0.5), (1, 0.5)),
}


def render(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One hollow seven-segment `digit` as an 8-bit grayscale image (dark ink on light), 60-100 px."""
    side = int(rng.integers(60, 101))
    paper = int(rng.integers(215, 256))
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    h = side * rng.uniform(0.5, 0.8)
    w = h * rng.uniform(0.45, 0.7)
    x0 = rng.uniform(0.1 * side, side - w - 0.1 * side)
    y0 = rng.uniform(0.05 * side, side - h - 0.05 * side)
    slant = rng.uniform(-0.25, 0.25)  # x shift per unit of height, as an italic display
    gap = rng.uniform(0.0, 0.12)  # segments stop short of the corners, as on an LCD
    width = max(2, int(h * rng.uniform(0.07, 0.14)))
    ink = int(rng.integers(0, 60))
    for seg in SEGMENTS[digit]:
        (ax, ay), (bx, by) = _ENDS[seg]
        # shorten the segment by `gap` at both ends
        ax, bx = ax + gap * (bx - ax), bx - gap * (bx - ax)
        ay, by = ay + gap * (by - ay), by - gap * (by - ay)
        pts = [(x0 + w * (x + slant * (1 - y)), y0 + h * y) for x, y in ((ax, ay), (bx, by))]
        draw.line(pts, fill=255, width=width)
    # The segments' outline: the filled shape grown by two pixels, less the shape itself.
    filled = np.asarray(img) > 0
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(5))) > 0
    a = np.where(grown & ~filled, ink, paper).astype(np.float32)
    a += rng.normal(0, 6, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def sample(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """n rendered digits (balanced over 0..9, shuffled) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    return [render(int(d), rng) for d in labels], labels.astype(np.int64)

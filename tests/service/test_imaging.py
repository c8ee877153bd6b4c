"""Decoding and the real-world normalisation (service.imaging)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core import network
from core.preprocess import to_vectors
from service import imaging
from service.errors import ApiError
from tests.helpers import bomb_png, png_bytes

LIMIT = 16_000_000


def roundtrip(data: bytes, preprocess: bool = True) -> np.ndarray:
    return imaging.to_mnist(imaging.decode(data, LIMIT), preprocess)


def test_mnist_digit_is_untouched(mnist):
    for image in mnist.test_images[:50]:
        out = roundtrip(png_bytes(image))
        assert out.dtype == np.uint8 and np.array_equal(out, image)
        assert np.array_equal(to_vectors(out), to_vectors(image))


def test_inverted_28x28_is_inverted_back_exactly(mnist):
    image = mnist.test_images[0]
    assert np.array_equal(roundtrip(png_bytes(255 - image)), image)
    # ... unless preprocessing is off
    assert np.array_equal(roundtrip(png_bytes(255 - image), preprocess=False), 255 - image)


def test_modes_become_the_same_gray(mnist):
    image = mnist.test_images[1]
    base = roundtrip(png_bytes(image))
    for mode in ("RGB", "P", "1", "LA", "RGBA"):
        out = roundtrip(png_bytes(image, mode))
        if mode == "1":
            assert out.shape == (28, 28)
        else:
            assert np.array_equal(out, base), mode
    cmyk = roundtrip(png_bytes(image, "CMYK", fmt="JPEG", quality=100))
    assert np.abs(cmyk.astype(int) - image).mean() < 12


def test_16_bit_png_is_scaled_to_8_bit(mnist):
    image = mnist.test_images[2]
    wide = Image.fromarray(image.astype(np.uint16) * 257)  # I;16
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert np.array_equal(roundtrip(buf.getvalue()), image)


def test_alpha_goes_on_the_background_that_shows_the_ink(mnist):
    image = mnist.test_images[3]
    # Black ink drawn on a transparent canvas (what a browser canvas gives): alpha carries the digit.
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = image
    assert np.array_equal(roundtrip(png_bytes(rgba)), image)
    # White ink on transparent: the same digit.
    rgba[..., :3] = 255
    assert np.array_equal(roundtrip(png_bytes(rgba)), image)
    # Nothing drawn at all: a blank image, not an error.
    assert not roundtrip(png_bytes(np.zeros((28, 28, 4), np.uint8))).any()


def test_animated_gif_gives_first_frame(mnist):
    frames = [Image.fromarray(a) for a in mnist.test_images[:3]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    assert np.array_equal(roundtrip(buf.getvalue()), mnist.test_images[0])


@pytest.mark.parametrize("shape", [(1, 1), (1, 10000), (10000, 1), (3, 500), (600, 900)])
def test_odd_sizes_give_a_28x28_image(shape):
    rng = np.random.default_rng(0)
    out = roundtrip(png_bytes(rng.integers(0, 256, shape, dtype=np.uint8)))
    assert out.shape == (28, 28) and out.min() >= 0 and out.max() <= 255


def test_decompression_bomb_is_refused_before_decoding():
    for w, h in ((30000, 30000), (LIMIT + 1, 1), (2**31 - 1, 2**31 - 1)):
        with pytest.raises(ApiError) as e:
            imaging.decode(bomb_png(w, h), LIMIT)
        assert e.value.status == 413, (w, h)
    with pytest.raises(ApiError) as e:  # under the limit it is decoded, and found truncated
        imaging.decode(bomb_png(3000, 3000), LIMIT)
    assert e.value.status == 400


@pytest.mark.parametrize("cut", [8, 20, 33, 60, 150, -60])
def test_truncated_png_is_a_400(mnist, cut):
    """Cut anywhere before the pixel data ends. (Only the 12-byte IEND missing is harmless.)"""
    data = png_bytes(mnist.test_images[0])
    with pytest.raises(ApiError) as e:
        imaging.decode(data[:cut], LIMIT)
    assert e.value.status == 400


def test_centring_follows_mnist(mnist):
    """A digit anywhere in a large canvas ends up fitting 20×20 with its centre of mass at (14, 14)."""
    canvas = np.zeros((200, 300), np.uint8)
    big = np.asarray(Image.fromarray(mnist.test_images[0]).resize((112, 112), Image.Resampling.BILINEAR))
    canvas[5:117, 170:282] = big
    out = roundtrip(png_bytes(255 - canvas)).astype(float)  # dark ink on white paper
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 22
    ys = np.arange(28)
    cy = (out.sum(axis=1) * ys).sum() / out.sum()
    cx = (out.sum(axis=0) * ys).sum() / out.sum()
    assert abs(cy - 14) < 0.6 and abs(cx - 14) < 0.6


def real_world(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """An MNIST digit the way photos and drawings arrive: scaled up, off-centre on a larger
    canvas, dark ink on light paper, a little background noise."""
    scale = int(rng.integers(2, 6))
    big = np.asarray(Image.fromarray(image).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    h, w = 28 * scale + int(rng.integers(20, 120)), 28 * scale + int(rng.integers(20, 120))
    canvas = np.zeros((h, w), np.uint8)
    top, left = int(rng.integers(0, h - big.shape[0] + 1)), int(rng.integers(0, w - big.shape[1] + 1))
    canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
    paper = 235 - canvas.astype(int) * 215 // 255 + rng.integers(-8, 9, canvas.shape)
    return png_bytes(np.clip(paper, 0, 255).astype(np.uint8))


def test_real_world_digits_are_recognised_nearly_as_well(mnist, trained_net):
    n = 400
    images, labels = mnist.test_images[:n], mnist.test_labels[:n]
    original = np.mean(network.predict(trained_net, to_vectors(images)) == labels)
    rng = np.random.default_rng(1)
    changed = np.stack([roundtrip(real_world(a, rng)) for a in images])
    accuracy = np.mean(network.predict(trained_net, to_vectors(changed)) == labels)
    assert accuracy >= original - 0.04, (accuracy, original)


def test_real_world_without_normalisation_fails(mnist, trained_net):
    """The control: naive resizing of the same images loses most digits."""
    n = 200
    rng = np.random.default_rng(1)
    naive = []
    for a in mnist.test_images[:n]:
        gray = imaging.decode(real_world(a, rng), LIMIT)
        naive.append(np.asarray(Image.fromarray(gray).resize((28, 28), Image.Resampling.BILINEAR)))
    accuracy = np.mean(network.predict(trained_net, to_vectors(np.stack(naive))) == mnist.test_labels[:n])
    assert accuracy < 0.5


def _generic(data: bytes) -> np.ndarray:
    """What Pillow's own reader makes of the whole file: the reference for the service's PNG path,
    which hands Pillow only the chunks an image needs (after walking and checking all of them)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return imaging._to_gray(img)


@pytest.mark.parametrize("mode", ["L", "RGB", "LA", "RGBA"])
@pytest.mark.parametrize("shape", [(28, 28), (1, 1), (3, 500), (97, 61)])
def test_plain_pngs_decode_as_pillow_reads_them(mode, shape):
    rng = np.random.default_rng(sum(shape))
    channels = len(mode)
    pixels = rng.integers(0, 256, size=(*shape, channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    for options in ({}, {"optimize": True}, {"compress_level": 0}):
        buf = io.BytesIO()
        img.save(buf, "PNG", **options)
        data = buf.getvalue()
        assert np.array_equal(imaging.decode(data, LIMIT), _generic(data)), (mode, shape, options)


def test_other_pngs_decode_as_pillow_reads_them(mnist):
    image = mnist.test_images[3]
    transparent = io.BytesIO()
    Image.fromarray(image).save(transparent, "PNG", transparency=0)
    sixteen = io.BytesIO()
    Image.fromarray(image.astype(np.uint16) * 257).save(sixteen, "PNG")
    others = {
        "palette": png_bytes(image, "P"),
        "1-bit": png_bytes(image, "1"),
        "16-bit": sixteen.getvalue(),
        "tRNS": transparent.getvalue(),
    }
    for name, data in others.items():
        assert np.array_equal(imaging.decode(data, LIMIT), _generic(data)), name


def test_a_bad_crc_is_a_400_and_chunks_an_image_does_not_need_are_dropped(mnist):
    data = bytearray(png_bytes(mnist.test_images[0]))
    bad_crc = bytearray(data)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    with pytest.raises(ApiError) as e:  # the chunk walk refuses it before Pillow sees it
        imaging.decode(bytes(bad_crc), LIMIT)
    assert e.value.status == 400
    chunk = b"ZZZZ" + b"data"
    unknown = data[:33] + struct.pack(">I", 4) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    assert np.array_equal(imaging.decode(bytes(unknown), LIMIT), mnist.test_images[0])


def test_corrupt_pixels_are_a_400(mnist):
    data = png_bytes(mnist.test_images[0])
    length = struct.unpack(">I", data[33:37])[0]  # the first chunk after IHDR is IDAT for Pillow
    assert data[37:41] == b"IDAT"
    body = bytes(length)  # zeros: not a zlib stream
    chunk = b"IDAT" + body
    broken = (
        data[:33]
        + struct.pack(">I", length)
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + data[45 + length :]
    )
    with pytest.raises(ApiError) as e:  # well-formed chunks, so the decoder runs ...
        imaging.decode(broken, LIMIT)
    assert e.value.status == 400  # ... and the decoder's failure is the client's error

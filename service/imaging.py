"""From untrusted bytes (or JSON numbers) to a 28×28 MNIST-like array.

Two steps with two jobs:

`decode` turns bytes into one grayscale frame, safely: the pixel count is
checked from the header before any pixel is decoded (decompression bombs),
every decoder failure is a client error, animations give their first frame,
and 16-bit, palette, CMYK and alpha images become 8-bit gray. Transparent
pixels are filled with the background that makes the opaque ink stand out
(dark ink -> white background, light ink -> black).

`to_mnist` is the real-world normalisation (`preprocess=auto`), the way MNIST
itself was made:

1. if the image's border is light (mean > 127.5), it is dark ink on a light
   background: invert it, because MNIST is light ink on black;
2. a 28×28 image is then used as it is: it already is in MNIST's format, and
   an MNIST digit must reach `core.preprocess.to_vectors` untouched so that
   served and offline predictions match bit for bit;
3. any other size is cropped to its ink, scaled to fit 20×20 keeping its
   aspect ratio, and pasted into 28×28 with its centre of mass at the centre.

`preprocess=none` skips all of this and requires a 28×28 image.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.preprocess import IMAGE_SIDE
from service.errors import ApiError

BOX = 20  # MNIST scaled each digit's bounding box to fit 20×20 ...
CENTRE = 14.0  # ... and put its centre of mass here (row/column index; measured on MNIST: 13.99, 14.00)
INK_THRESHOLD = 40  # after background removal, fainter pixels are noise, not ink
WORK_SIDE = 560  # larger images are reduced first: a digit needs no more, and it bounds the work

# Formats whose plugins shell out to external programs (Ghostscript) are never opened.
_EXCLUDED_FORMATS = {"EPS", "PDF"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


@functools.cache
def _allowed_formats() -> tuple[str, ...]:
    """Pillow's readers minus the excluded ones, PNG and JPEG first: Image.open tries them in order."""
    Image.init()
    first = [f for f in ("PNG", "JPEG") if f in Image.OPEN]
    return (*first, *(f for f in Image.OPEN if f not in _EXCLUDED_FORMATS and f not in first))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> Pillow mode, for 8-bit samples: gray, RGB, gray+alpha, RGBA.
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}


def _plain_png(data: bytes) -> tuple[str, tuple[int, int], bytes] | None:
    """(mode, size, zlib stream) of a well-formed, 8-bit, non-interlaced PNG without palette
    or tRNS, else None.

    This is how digits usually arrive (MNIST as PNG, a canvas export), and for
    a 28×28 image Pillow's generic open -- plugin probing and a Python chunk
    reader -- costs about as much again as this whole path: about 55 µs of a
    /predict request's ~900 µs of CPU (`python bench/decode_speed.py`). Here the chunks are
    walked with `struct`, every CRC is checked, and the pixels are still
    inflated and unfiltered by Pillow's own PNG decoder (`Image.frombytes`
    with the "zip" decoder, in `decode`). Anything unusual returns None and
    takes the generic path, which gives the precise error.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, end, header, idat = 8, len(data), None, []
    while True:
        if pos + 12 > end:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(data[pos + 4 : stop]) != struct.unpack_from(">I", data, stop)[0]:
            return None
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            idat.append(data[pos + 8 : stop])
        elif kind == b"IEND":
            break
        elif kind in (b"PLTE", b"tRNS", b"IHDR") or kind[0] & 0x20 == 0:
            return None  # a palette, a transparent colour, or a critical chunk this path does not know
        pos = stop + 4
    width, height, depth, colour, compression, filtering, interlace = header
    mode = _PNG_MODES.get(colour)
    if mode is None or depth != 8 or compression or filtering or interlace or not idat:
        return None
    return mode, (width, height), b"".join(idat)


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """One 8-bit grayscale frame (H, W) of `data`, or ApiError 400 / 413."""
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    try:
        if (png := _plain_png(data)) is not None:
            mode, size, stream = png
            _check_size(size, max_pixels)
            return _to_gray(Image.frombytes(mode, size, stream, "zip", mode))
        return _to_gray(_open_with_pillow(data, max_pixels))
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"image exceeds the pixel limit: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", "cannot identify an image in the request body") from None
    except Exception as e:  # any decoder failure on untrusted bytes is the client's error
        raise ApiError(400, "invalid_image", f"cannot decode the image: {type(e).__name__}: {e}") from None


def _open_with_pillow(data: bytes, max_pixels: int) -> Image.Image:
    """The generic path: any allowed format, found by Pillow's plugin probing, decoded."""
    img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    _check_size(img.size, max_pixels)
    img.load()  # an animation opens on its first frame; that frame is what is used
    return img


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse from the header, before a pixel is decoded. (Pillow's own check, which also
    applies on the generic path, only warns below 2 × Image.MAX_IMAGE_PIXELS.)"""
    w, h = size
    if w * h > max_pixels:
        raise ApiError(
            413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
        )
    if w < 1 or h < 1:
        raise ApiError(400, "invalid_image", f"image has no pixels ({w}x{h})")


def _to_gray(img: Image.Image) -> np.ndarray:
    """8-bit luminance, alpha composited on the background that contrasts with the ink."""
    sixteen_bit = img.mode.startswith("I;16")
    if max(img.size) > WORK_SIDE:
        if img.mode == "P":  # resampling needs real colours, not palette indices
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode.startswith("I;16"):
            img = img.convert("I")
        img.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
    mode = img.mode
    if mode in _WIDE_MODES:
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=65535.0, neginf=0.0)
        if sixteen_bit or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit range -> 8-bit
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        la = np.asarray(img.convert("RGBA").convert("LA"), dtype=np.float32)
        lum, alpha = la[..., 0], la[..., 1] / 255.0
        weight = float(alpha.sum())
        if weight == 0.0:  # fully transparent: nothing drawn
            return np.zeros(lum.shape, np.uint8)
        ink_is_dark = float((lum * alpha).sum()) / weight < 127.5
        background = 255.0 if ink_is_dark else 0.0
        return np.rint(lum * alpha + background * (1.0 - alpha)).astype(np.uint8)
    if mode == "L":  # the common case; frombuffer skips the array-interface machinery
        return np.frombuffer(img.tobytes(), np.uint8).reshape(img.height, img.width)
    try:
        return np.asarray(img.convert("L"))
    except ValueError:  # modes with no direct path to L (e.g. LAB, HSV)
        return np.asarray(img.convert("RGB").convert("L"))


def border_is_light(a: np.ndarray) -> bool:
    """True when the outermost rows and columns are light on average: dark ink on paper."""
    h, w = a.shape
    if h <= 2 or w <= 2:
        return float(a.mean()) > 127.5
    border = float(a.sum()) - float(a[1:-1, 1:-1].sum())  # two reductions: this is on the hot path
    return border / (2 * w + 2 * (h - 2)) > 127.5


def to_mnist(a: np.ndarray, preprocess: bool = True) -> np.ndarray:
    """A (28, 28) array of values 0..255, light ink on black, for `core.preprocess.to_vectors`."""
    if not preprocess:
        if a.shape != (IMAGE_SIDE, IMAGE_SIDE):
            raise ApiError(
                400, "wrong_shape", f"preprocess=none needs a 28x28 image, got {a.shape[1]}x{a.shape[0]}"
            )
        return a
    if border_is_light(a):
        a = 255 - a
    if a.shape == (IMAGE_SIDE, IMAGE_SIDE):
        return a
    return _centre(a)


def _centre(a: np.ndarray) -> np.ndarray:
    """Crop to the ink, fit it into 20×20 keeping aspect, paste with its centre of mass at (14, 14)."""
    a = a.astype(np.float32)
    background = float(np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])))
    if background < 255.0:  # stretch so the background is 0 and the full ink range remains
        a = np.clip((a - background) * (255.0 / (255.0 - background)), 0.0, 255.0)
    rows = np.flatnonzero((a > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((a > INK_THRESHOLD).any(axis=0))
    out = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    if rows.size == 0:
        return out  # blank: nothing to centre
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    digit = Image.fromarray(crop).resize((nw, nh), Image.Resampling.LANCZOS)
    d = np.clip(np.asarray(digit), 0.0, 255.0)
    mass = float(d.sum())
    if mass == 0.0:
        return out
    cy = float((d.sum(axis=1) * np.arange(nh)).sum()) / mass
    cx = float((d.sum(axis=0) * np.arange(nw)).sum()) / mass
    top, left = round(CENTRE - cy), round(CENTRE - cx)
    # Paste with clipping: a lopsided digit's centre of mass can push part of it off the edge.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + nh, IMAGE_SIDE), min(left + nw, IMAGE_SIDE)
    out[y0:y1, x0:x1] = d[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.rint(out)

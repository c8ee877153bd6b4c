"""From untrusted bytes (or JSON numbers) to a 28×28 MNIST-like array.

Two steps with two jobs:

`decode` turns bytes into one grayscale frame, safely: only the formats in
FORMATS are opened (415 otherwise), the pixel count is checked from the
header before any pixel is decoded (decompression bombs), every decoder
failure is a client error, animations give their first frame, a large JPEG
is scaled down while it is decoded, and 16-bit, palette, CMYK and alpha
images become 8-bit gray. `decode_batch` checks every image's header, and
the pixels of all of them together, before it decodes the first. Transparent
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

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.preprocess import IMAGE_SIDE
from service.errors import ApiError

T = TypeVar("T")

BOX = 20  # MNIST scaled each digit's bounding box to fit 20×20 ...
CENTRE = 14.0  # ... and put its centre of mass here (row/column index; measured on MNIST: 13.99, 14.00)
INK_THRESHOLD = 40  # after background removal, fainter pixels are noise, not ink
WORK_SIDE = 560  # larger images are reduced first: a digit needs no more, and it bounds the work

# The formats a client may send, each one whose size Pillow learns from the header without
# decoding a pixel (checked in Pillow 13's plugins): PNG (IHDR), JPEG (SOF; a JPEG carrying
# an MPO index opens as MPO, whose first frame is that JPEG), GIF (the logical screen and the
# first frame's descriptor), BMP (the DIB header), WebP (the VP8/VP8L/VP8X header, read here
# before Pillow's animation decoder allocates its canvases). Left out: containers that decode
# an embedded image inside Image.open (ICO, CUR, ICNS, DCX ...), TIFF (many codecs, pages and
# tiles), formats with plugins that call external programs (EPS, PDF) and the rest, which no
# digit client sends. Anything else is a 415.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
# A progressive JPEG may hold any number of scans, and each one is a pass over the whole
# image: libjpeg takes seconds for a small file with thousands. Real encoders write about 10.
MAX_JPEG_SCANS = 64
# Pillow walks a file's structure in Python: a JPEG's markers before the first scan, a GIF's
# blocks before its first image, every PNG chunk. Real files have tens (a PNG's image data
# comes in chunks of 8 to 64 kB); a 4 MiB file of empty ones would cost seconds. So an image
# may hold MAX_STRUCTURE of them, and all of a request's images MAX_REQUEST_STRUCTURE (a batch
# of 1024 real digits holds about 5000), at a few microseconds each.
MAX_STRUCTURE = 4096
MAX_REQUEST_STRUCTURE = 16 * MAX_STRUCTURE
_BMP_COMPRESSIONS = (0, 3)  # plain and bit fields: the RLE decoders are pure Python and slow


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The chunks a PNG's first image needs; the rest (text, which Pillow inflates while opening,
# ICC profiles, APNG's frames) is dropped before Pillow sees the file.
_PNG_KEPT = (b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND")


Chunks = list[tuple[bytes, int, int]]


def _png_chunks(data: bytes) -> Chunks | None:
    """(type, start, stop) of each chunk of a PNG up to IEND, every CRC checked; None when
    `data` is not a PNG or a chunk is malformed. `struct` only: nothing is inflated."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, end, chunks = 8, len(data), []
    while True:
        if pos + 12 > end:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(data[pos + 4 : stop]) != struct.unpack_from(">I", data, stop)[0]:
            return None
        chunks.append((kind, pos, stop + 4))
        if kind == b"IEND":
            return chunks
        if len(chunks) > MAX_STRUCTURE:
            raise ApiError(400, "invalid_image", f"the PNG has more than {MAX_STRUCTURE} chunks")
        pos = stop + 4


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP declares (RIFF header, then VP8, VP8L or VP8X), None if unreadable.

    Read here because Pillow's WebP plugin creates libwebp's animation decoder,
    which allocates the canvas, inside Image.open."""
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _format_of(data: bytes) -> str | None:
    """Which allowed format `data` claims by its magic bytes, or None."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    """The name of a format Pillow knows but this service refuses, told by the magic bytes alone:
    Pillow's `accept` checks look at the first bytes and open nothing."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix) is True:
                return name
        except Exception:  # an accept check that trips over odd bytes says no
            continue
    return None


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """One 8-bit grayscale frame (H, W) of `data`, or ApiError 400 / 413 / 415."""
    return _decoding(lambda: _decode(_probe(data, max_pixels)))


def decode_batch(blobs: list[bytes], max_pixels: int, max_request_pixels: int) -> list[np.ndarray]:
    """Every image of a request, once the headers have shown that each fits `max_pixels` and all
    of them together fit `max_request_pixels` (413 otherwise): a request's decoding work and
    memory are bounded by its budget, not by how many images fit in the body."""
    probes, total, parts = [], 0, 0
    for i, data in enumerate(blobs):
        probe = _decoding(lambda data=data: _probe(data, max_pixels))
        total += probe.size[0] * probe.size[1]
        parts += probe.parts
        if parts > MAX_REQUEST_STRUCTURE:
            raise ApiError(
                413,
                "request_too_large",
                f"the first {i + 1} images hold more than {MAX_REQUEST_STRUCTURE} chunks, markers or "
                "blocks together",
            )
        if total > max_request_pixels:
            raise ApiError(
                413,
                "request_too_large",
                f"the first {i + 1} images declare {total} pixels; the limit per request is "
                f"MAX_REQUEST_PIXELS={max_request_pixels}",
            )
        probes.append(probe)
    return [_decoding(lambda probe=probe: _decode(probe)) for probe in probes]


def _decoding(step: Callable[[], T]) -> T:
    """Run a step on untrusted bytes: every failure is the client's error, as a JSON 4xx."""
    try:
        return step()
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"image exceeds the pixel limit: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "invalid_image", "cannot identify an image in the request body") from None
    except Exception as e:  # any decoder failure on untrusted bytes is the client's error
        raise ApiError(400, "invalid_image", f"cannot decode the image: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class _Probe:
    """What an image's header says, checked; enough to decode it without reading the header again."""

    size: tuple[int, int]
    kind: str  # one of FORMATS
    data: bytes  # what Pillow opens (a PNG: its image chunks only)
    parts: int  # chunks, markers or blocks walked to find the size (MAX_REQUEST_STRUCTURE)


def _probe(data: bytes, max_pixels: int) -> _Probe:
    """The image's format and size from its header, both checked; no pixel is decoded."""
    if not data:
        raise ApiError(400, "empty_image", "the image is empty (0 bytes)")
    kind = _format_of(data)
    if kind is None:
        other = _other_format(data)
        if other is None:
            raise ApiError(400, "invalid_image", "cannot identify an image in the request body")
        raise ApiError(
            415,
            "unsupported_image_format",
            f"{other} images are not accepted; send one of {', '.join(FORMATS)}",
        )
    if kind == "PNG":
        chunks = _png_chunks(data)
        if chunks is None:
            raise ApiError(400, "invalid_image", "the PNG is truncated or has a corrupt chunk")
        parts = len(chunks)
        kept = _PNG_SIGNATURE + b"".join(data[a:b] for k, a, b in chunks if k in _PNG_KEPT)
        kind_of_first, start, stop = chunks[0]
        if kind_of_first == b"IHDR" and stop - start == 25:  # its size, read once by the walk above
            size = struct.unpack_from(">II", data, start + 8)
            _check_size(size, max_pixels)
            return _Probe(size, kind, kept, parts)
        data = kept  # Pillow describes what is wrong with the header
    elif kind == "WEBP":  # its size from the header alone: Image.open allocates the canvas
        size = _webp_size(data)
        if size is None:
            raise ApiError(400, "invalid_image", "the WebP header is truncated or unknown")
        _check_size(size, max_pixels)
        return _Probe(size, kind, data, 1)
    elif kind == "JPEG":
        parts = _check_jpeg(data)
    elif kind == "GIF":
        parts = _check_gif(data)
    else:
        parts = _check_bmp(data)
    size = Image.open(io.BytesIO(data), formats=(kind,)).size
    _check_size(size, max_pixels)
    return _Probe(size, kind, data, parts)


def _decode(probe: _Probe) -> np.ndarray:
    """The first frame of a probed image, as 8-bit gray."""
    img = Image.open(io.BytesIO(probe.data), formats=(probe.kind,))
    if img.size != probe.size:  # the header said one size, the decoder found another
        raise ApiError(400, "invalid_image", f"the image is {img.size}, its header said {probe.size}")
    if img.format in ("JPEG", "MPO") and max(img.size) > WORK_SIDE:
        img.draft(None, (WORK_SIDE, WORK_SIDE))  # libjpeg scales by 1/2, 1/4 or 1/8 while decoding
    img.load()  # an animation opens on its first frame; that frame is what is used
    return _to_gray(img)


def _check_jpeg(data: bytes) -> int:
    """Refuse a JPEG whose structure would cost more than its pixels: over MAX_JPEG_SCANS scans
    (libjpeg makes a pass over the image for each) or MAX_STRUCTURE markers before the first;
    else the number of markers, for the request's MAX_REQUEST_STRUCTURE."""
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ApiError(400, "invalid_image", f"the JPEG has more than {MAX_JPEG_SCANS} scans")
    pos, end = 2, len(data)
    for markers in range(1, MAX_STRUCTURE + 1):
        start = pos
        while pos < end and data[pos] == 0xFF:  # a marker, after any fill bytes
            pos += 1
        if pos == start or pos >= end or data[pos] == 0xDA:
            return markers  # the first scan, or a malformed file Pillow will describe
        marker, pos = data[pos], pos + 1
        if not (0xD0 <= marker <= 0xD9 or marker == 0x01):  # these have no length
            if pos + 2 > end:
                return markers
            pos += int.from_bytes(data[pos : pos + 2], "big")
    raise ApiError(400, "invalid_image", f"the JPEG has more than {MAX_STRUCTURE} markers before its image")


def _check_gif(data: bytes) -> int:
    """Refuse a GIF with more than MAX_STRUCTURE blocks (extensions and their sub-blocks) before
    its first image; else the number of blocks, for the request's MAX_REQUEST_STRUCTURE."""
    pos, end = 13, len(data)
    if end > 10 and data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)  # the global colour table
    blocks = 0
    while pos < end and data[pos] == 0x21:  # an extension: label, then sub-blocks up to an empty one
        pos += 2
        while True:
            blocks += 1
            if blocks > MAX_STRUCTURE:
                raise ApiError(
                    400, "invalid_image", f"the GIF has more than {MAX_STRUCTURE} blocks before its image"
                )
            if pos >= end or not data[pos]:
                break
            pos += 1 + data[pos]
        pos += 1
    return blocks + 1


def _check_bmp(data: bytes) -> int:
    """Refuse what Pillow's BMP plugin handles in Python loops: RLE compression (a pure-Python
    decoder) and palettes over 256 colours (a Python loop per declared colour, up to 65536, run
    inside Image.open however short the file). One header: 1 towards MAX_REQUEST_STRUCTURE."""
    if len(data) < 18 or int.from_bytes(data[14:18], "little") < 40 or len(data) < 50:
        return 1  # the old OS/2 header: no compression, at most 256 colours
    compression = int.from_bytes(data[30:34], "little")
    if compression not in _BMP_COMPRESSIONS:
        raise ApiError(415, "unsupported_image_format", f"BMP compression {compression} is not accepted")
    if int.from_bytes(data[46:50], "little") > 256:
        raise ApiError(400, "invalid_image", "the BMP declares a palette of more than 256 colours")
    return 1


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

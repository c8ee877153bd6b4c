"""A request's cost is bounded by the limits, whatever its images claim: a property test.

For every accepted format (service.imaging.FORMATS) hypothesis crafts the
worst inputs a client can send within every limit (MAX_CONTENT_LENGTH,
MAX_BATCH): real images up to and past the pixel limits, tiny files whose
headers declare huge sizes, many frames, embedded images, palettes,
progressive scans, truncated data, and batches of up to MAX_BATCH of them.
Each goes to a real gunicorn with one worker, whose CPU time (/proc/PID/stat)
and peak resident memory (VmHWM, /proc/PID/status) are read around the
request. The answer must be a correct 200 or a 4xx JSON error, the request
must cost at most CPU_BOUND_SECONDS of the worker's CPU, and the worker's
peak memory must stay within MEMORY_BOUND_MIB of what it held after boot.
These are the bounds docs/api.md states for the default limits.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.settings import Settings
from tests.helpers import Server, bomb_png, png_chunk, publish, random_net, start_gunicorn

CPU_BOUND_SECONDS = 1.0
MEMORY_BOUND_MIB = 200
MAX_BODY = Settings().max_content_length
MAX_BATCH = Settings().max_batch
BUDGET = Settings().max_request_pixels
TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("cost") / "models"
    publish(d, random_net())
    # One worker, so every request lands where it is measured; a long timeout, so that a
    # request over the bound shows as a measured figure rather than a killed worker.
    with start_gunicorn(
        d, tmp_path_factory.mktemp("gunicorn"), WEB_CONCURRENCY="1", GUNICORN_TIMEOUT="300"
    ) as s:
        yield s


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, all threads


def _memory_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


# --- crafted images ----------------------------------------------------------------------


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _declare(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """`data` (a small real image) with a header that claims w×h pixels."""
    b = bytearray(data)
    if fmt == "PNG":
        return bomb_png(w, h)
    if fmt == "GIF":
        struct.pack_into("<HH", b, 6, min(w, 65535), min(h, 65535))
    elif fmt == "BMP":
        struct.pack_into("<ii", b, 18, w, h)
    elif fmt == "JPEG":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0:
                struct.pack_into(">HH", b, at + 5, min(h, 65535), min(w, 65535))
    elif fmt == "WEBP" and data[12:16] == b"VP8L":  # lossless: 14 bits each, minus one
        bits = (min(w, 16384) - 1) | ((min(h, 16384) - 1) << 14)
        struct.pack_into("<I", b, 21, (int.from_bytes(data[21:25], "little") & ~0xFFFFFFF) | bits)
    return bytes(b)


def _png_with_text(img: Image.Image, chunks: int) -> bytes:
    """A PNG carrying compressed text chunks that inflate to 1 MB each (Pillow's per-chunk cap)."""
    data = _save(img, "PNG")
    bomb = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 1_000_000, 9))
    return data[:33] + bomb * chunks + data[33:]


def _palette_bmp(colours: int) -> bytes:
    """An 8-bit BMP header declaring `colours` palette entries, and nothing after it."""
    data = bytearray(_save(Image.new("P", (8, 8)), "BMP"))
    struct.pack_into("<I", data, 46, colours)
    return bytes(data)


@st.composite
def crafted(draw: st.DrawFn) -> tuple[str, bytes]:
    """(what, image bytes): one worst case of one accepted format, or a refused container."""
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "MPO", "ICO", "TIFF"]))
    side = draw(st.sampled_from([8, 28, 300, 1000, 2000, 2100, 4000]))
    w = draw(st.integers(1, side))
    h = draw(st.integers(max(1, side // 2), side))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"]))
    frames = draw(st.sampled_from([1, 2, 50]))
    kind = draw(st.sampled_from(["real", "declares", "truncated", "text", "palette"]))
    if kind == "declares":  # a tiny file whose header claims a size of the hypothesis' choice
        big_w, big_h = draw(st.integers(1, 70000)), draw(st.integers(1, 70000))
        small = _save(Image.new("RGB", (8, 8)), "JPEG" if fmt == "MPO" else fmt if fmt != "TIFF" else "PNG")
        return f"{fmt} 8x8 declaring {big_w}x{big_h}", _declare(small, fmt, big_w, big_h)
    if kind == "palette":
        return "BMP declaring 65536 colours", _palette_bmp(65536)
    if w * h * frames > 2 * BUDGET:
        frames = 1  # building 50 frames of 4 Mpx would take the test's own time
    img = Image.new("L", (w, h), 255)
    img.paste(0, (w // 3, h // 4, max(w // 3 + 1, w // 2), max(h // 4 + 1, 3 * h // 4)))  # some ink
    if mode == "I;16" and fmt in ("PNG",):
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    elif fmt in ("JPEG", "MPO"):
        img = img.convert("RGB" if mode != "L" else "L")
    elif mode in ("RGB", "RGBA", "P"):
        img = img.convert(mode)
    more = [img.rotate(90 * i) for i in range(1, frames)]
    if kind == "text" and fmt == "PNG":
        return f"PNG {w}x{h} with 64 text bombs", _png_with_text(img, 64)
    try:
        if fmt == "JPEG":
            data = _save(img, "JPEG", progressive=frames > 1, quality=90)
        elif fmt == "MPO":
            data = _save(img, "MPO", save_all=True, append_images=more or [img])
        elif fmt == "ICO":  # a container: a large PNG inside a small directory
            data = _save(img.convert("RGBA"), "ICO", sizes=[(min(w, 256), min(h, 256))])
        elif fmt == "WEBP":
            data = _save(img, "WEBP", lossless=True, save_all=frames > 1, append_images=more)
        elif fmt in ("PNG", "GIF", "TIFF"):
            data = _save(img, fmt, save_all=frames > 1, append_images=more)
        else:
            data = _save(img, fmt)
    except (OSError, ValueError, KeyError):
        data = _save(img.convert("RGB"), "PNG" if fmt not in ("JPEG", "MPO") else "JPEG")
    if kind == "truncated":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    return f"{fmt} {mode} {w}x{h} x{frames} {kind}", data


def _multipart(images: list[bytes]) -> tuple[bytes, str]:
    boundary = "costboundary7d1e"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _check_answer(r: requests.Response, n: int) -> None:
    assert r.headers.get("Content-Type", "").startswith("application/json"), (r.status_code, r.text[:200])
    body = r.json()
    if r.status_code == 200:
        predictions = body.get("predictions", [body])
        assert len(predictions) == n
        for p in predictions:
            assert 0 <= p["digit"] <= 9 and abs(sum(p["probabilities"]) - 1) < 1e-4
            assert p["probabilities"][p["digit"]] == max(p["probabilities"])
    else:
        assert 400 <= r.status_code < 500 and body["error"]["code"], (r.status_code, body)


def _blank(fmt: str, w: int, h: int, mode: str = "L", **kw: object) -> bytes:
    return _save(Image.new(mode, (w, h), 255), fmt, **kw)


def _padded(fmt: str, size: int) -> bytes:
    """A 28x28 image of `fmt` grown to about `size` bytes with the emptiest structure the format
    has (PNG chunks, JPEG markers, GIF comment sub-blocks): what Pillow walks in Python."""
    data = _blank(fmt, 28, 28, "P" if fmt == "GIF" else "L")
    if fmt == "PNG":
        return data[:33] + png_chunk(b"teXt", b"") * (size // 12) + data[33:]
    if fmt == "JPEG":
        return data[:2] + b"\xff\xfe\x00\x02" * (size // 4) + data[2:]
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the colour table
    return data[:at] + b"!\xfe" + b"\x01a" * (size // 2) + b"\x00" + data[at:]


SIDE = int(BUDGET**0.5)  # a square image at the request's pixel budget
# The worst cases found so far, always tried (hypothesis explores around them).
WORST = [
    (("WEBP lossless at the budget", _blank("WEBP", SIDE, SIDE, "RGBA", lossless=True)), 1, "predict"),
    (("WEBP lossless at the budget", _blank("WEBP", SIDE, SIDE, "RGBA", lossless=True)), 1, "explain"),
    (("WEBP lossless 4000x4000", _blank("WEBP", 4000, 4000, "RGBA", lossless=True)), 1, "predict"),
    (("WEBP lossless 4000x4000", _blank("WEBP", 4000, 4000, "RGBA", lossless=True)), MAX_BATCH, "predict"),
    (("PNG RGBA at the budget", _blank("PNG", SIDE, SIDE, "RGBA")), 1, "predict"),
    (
        ("PNG 16-bit at the budget", _save(Image.fromarray(np.zeros((SIDE, SIDE), np.uint16)), "PNG")),
        1,
        "predict",
    ),
    (("PNG 8x8 declaring 4000x4000", bomb_png(4000, 4000)), MAX_BATCH, "predict"),
    (("GIF at the budget", _blank("GIF", SIDE, SIDE, "P")), 1, "predict"),
    (("progressive JPEG at the budget", _blank("JPEG", SIDE, SIDE, "RGB", progressive=True)), 1, "predict"),
    (("BMP at the budget", _blank("BMP", SIDE, SIDE // 2, "L")), 1, "predict"),
    (("BMP declaring 65536 colours", _palette_bmp(65536)), MAX_BATCH, "predict"),
    (("PNG 62x62", _blank("PNG", 62, 62)), MAX_BATCH, "predict"),
    (("WEBP 62x62", _blank("WEBP", 62, 62, "RGBA", lossless=True)), MAX_BATCH, "predict"),
    (("PNG 28x28 with 64 text bombs", _png_with_text(Image.new("L", (28, 28)), 64)), 16, "predict"),
    # Structure rather than pixels: one image of empty parts filling the body, and MAX_BATCH
    # images each just under the per-image cap.
    *[
        ((f"{fmt} of empty parts", _padded(fmt, MAX_BODY - 2000)), 1, "predict")
        for fmt in ("PNG", "JPEG", "GIF")
    ],
    (("PNG of 300 empty parts", _padded("PNG", 3600)), MAX_BATCH, "predict"),
    (("JPEG of 800 empty parts", _padded("JPEG", 3200)), MAX_BATCH, "predict"),
    (("GIF of 1600 empty parts", _padded("GIF", 3200)), MAX_BATCH, "predict"),
]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    case=crafted(),
    copies=st.sampled_from([1, 1, 2, 16, MAX_BATCH]),
    route=st.sampled_from(["predict", "explain"]),
)
def test_one_request_within_the_limits_costs_at_most_the_bound(server, case, copies, route):
    n = copies if route == "predict" else 1
    assume(len(case[1]) * n + 200 * n < MAX_BODY)  # at or below every limit: the body must fit
    _request_within_the_bounds(server, case, copies, route)


@pytest.mark.parametrize(("case", "copies", "route"), WORST, ids=[f"{c[0][0]} x{c[1]} {c[2]}" for c in WORST])
def test_the_worst_cases_found_cost_at_most_the_bound(server, case, copies, route):
    assert len(case[1]) * copies + 200 * copies < MAX_BODY  # each is within every limit
    _request_within_the_bounds(server, case, copies, route)


def _request_within_the_bounds(server: Server, case: tuple[str, bytes], copies: int, route: str) -> None:
    what, data = case
    n = copies if route == "predict" else 1
    body, content_type = _multipart([data] * n) if n > 1 else (data, "application/octet-stream")
    (pid,) = server.workers()
    cpu0 = _cpu_seconds(pid)
    t0 = time.monotonic()
    r = requests.post(f"{server.url}/{route}", data=body, headers={"Content-Type": content_type}, timeout=120)
    wall = time.monotonic() - t0
    cpu = _cpu_seconds(pid) - cpu0
    _check_answer(r, n)
    peak = (_memory_kib(pid, "VmHWM") - BOOT_RSS.setdefault(pid, _boot_rss(server))) / 1024
    label = (
        f"{what} x{n} /{route}: {r.status_code} in {cpu:.2f} s CPU ({wall:.2f} s wall), peak +{peak:.0f} MiB"
    )
    COSTS.append((cpu, peak, label))
    assert cpu <= CPU_BOUND_SECONDS, label
    assert peak <= MEMORY_BOUND_MIB, label


BOOT_RSS: dict[int, int] = {}
COSTS: list[tuple[float, float, str]] = []


def _boot_rss(server: Server) -> int:
    """The worker's resident memory once it has answered one ordinary request (KiB)."""
    (pid,) = server.workers()
    return _memory_kib(pid, "VmRSS")


@pytest.fixture(scope="module", autouse=True)
def _report_costs(server: Server) -> Iterator[None]:
    (pid,) = server.workers()
    requests.post(server.url + "/predict", data=_save(Image.new("L", (28, 28)), "PNG"), timeout=30)
    BOOT_RSS[pid] = _memory_kib(pid, "VmRSS")
    yield
    if COSTS:
        by_cpu = sorted(COSTS, reverse=True)[:5]
        worst_mem = max(COSTS, key=lambda c: c[1])
        print("\nmost CPU:", *(c[2] for c in by_cpu), f"most memory: {worst_mem[2]}", sep="\n  ")

"""Hostile input: a battery of nasty bodies and property-based fuzzing.

Whatever arrives, the answer is a 4xx JSON error or a valid prediction:
never a 5xx, never a stack trace, never a dead worker.
"""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import bomb_png, png_bytes, png_chunk

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def hostile_battery() -> list[tuple[str, str | None, bytes]]:
    """(name, content type, body): the inputs real clients and attackers send."""
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    valid = png_bytes(digit)
    frames = [Image.fromarray(digit), Image.fromarray(255 - digit), Image.new("L", (5, 5))]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:2])
    cases: list[tuple[str, str | None, bytes]] = [
        ("random bytes", "image/png", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()),
        ("png magic only", "image/png", valid[:8]),
        ("truncated png", "image/png", valid[: len(valid) // 2]),
        ("png with bad crc", "image/png", valid[:30] + bytes([valid[30] ^ 0xFF]) + valid[31:]),
        ("bomb 20000x20000", "image/png", bomb_png(20000, 20000)),
        ("bomb 2^31x1", "image/png", bomb_png(2**31 - 1, 1)),
        ("zero width", "image/png", bomb_png(0, 10)),
        ("16-bit gray", "image/png", encode(Image.fromarray(digit.astype(np.uint16) * 257))),
        ("32-bit int", "image/tiff", encode(Image.fromarray(digit.astype(np.int32) * 1000), "TIFF")),
        ("float tiff", "image/tiff", encode(Image.fromarray(digit.astype(np.float32) * 1e30), "TIFF")),
        (
            "float tiff nan",
            "image/tiff",
            encode(Image.fromarray(np.full((28, 28), np.nan, np.float32)), "TIFF"),
        ),
        ("palette", "image/png", encode(Image.fromarray(digit).convert("P"))),
        (
            "palette+transparency",
            "image/gif",
            encode(Image.fromarray(digit).convert("P"), "GIF", transparency=0),
        ),
        ("cmyk jpeg", "image/jpeg", encode(Image.fromarray(digit).convert("CMYK"), "JPEG")),
        ("animated gif", "image/gif", animated.getvalue()),
        ("animated png", "image/png", apng.getvalue()),
        ("1x1", "image/png", png_bytes(np.full((1, 1), 200, np.uint8))),
        ("10000x1", "image/png", png_bytes(rng.integers(0, 256, (1, 10000), dtype=np.uint8))),
        ("1x10000", "image/png", png_bytes(rng.integers(0, 256, (10000, 1), dtype=np.uint8))),
        ("4000x4000 blank", "image/png", png_bytes(np.zeros((4000, 4000), np.uint8))),
        ("1-bit", "image/png", encode(Image.fromarray(digit).convert("1"))),
        ("LA", "image/png", encode(Image.fromarray(digit).convert("LA"))),
        ("rgba transparent", "image/png", png_bytes(np.zeros((28, 28, 4), np.uint8))),
        ("bmp", "image/bmp", encode(Image.fromarray(digit), "BMP")),
        ("ico", "image/x-icon", encode(Image.fromarray(digit), "ICO")),
        ("webp", "image/webp", encode(Image.fromarray(digit), "WEBP")),
        ("eps", "image/eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"),
        ("svg", "image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>'),
        (
            "huge text chunk",
            "image/png",
            valid[:33] + png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 3_000_000)) + valid[33:],
        ),
        ("empty body", "image/png", b""),
        ("no content type", None, valid),
        ("text/plain", "text/plain", valid),
        ("json: deep nesting", "application/json", b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("json: huge number", "application/json", b'{"image": [' + b"1" * 5000 + b"]}"),
        (
            "json: 1e999",
            "application/json",
            json.dumps({"image": [0] * 783}).replace("]", ",1e999]").encode(),
        ),
        ("json: nan", "application/json", b'{"image": [NaN]}'),
        ("json: strings", "application/json", json.dumps({"image": ["0"] * 784}).encode()),
        ("json: nulls", "application/json", json.dumps({"image": [None] * 784}).encode()),
        ("json: bools", "application/json", json.dumps({"image": [True] * 784}).encode()),
        ("json: objects", "application/json", json.dumps({"image": [{}] * 784}).encode()),
        ("json: 3d", "application/json", json.dumps({"image": [[[0] * 28] * 28] * 2}).encode()),
        ("json: 785", "application/json", json.dumps({"image": [0] * 785}).encode()),
        ("json: negative", "application/json", json.dumps({"image": [-1] * 784}).encode()),
        ("json: instances not list", "application/json", b'{"instances": 5}'),
        ("json: instances of junk", "application/json", json.dumps({"instances": [[0] * 784, "x"]}).encode()),
        ("json: top-level list", "application/json", b"[[0]]"),
        ("json: utf-16", "application/json", json.dumps({"image": [0] * 784}).encode("utf-16")),
        ("json: bad utf-8", "application/json", b'{"image": "\xff"}'),
        (
            "json: duplicate keys",
            "application/json",
            b'{"image": [0], "image": ' + json.dumps([0] * 784).encode() + b"}",
        ),
        ("multipart: no boundary", "multipart/form-data", b"--x\r\n\r\n"),
        (
            "multipart: garbage",
            "multipart/form-data; boundary=zz",
            rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        ),
        (
            "multipart: empty file",
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n\r\n--b--\r\n',
        ),
        (
            "multipart: text field",
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nhello\r\n--b--\r\n',
        ),
    ]
    return cases


BATTERY = hostile_battery()


def check(status: int, content_type: str, text: str) -> None:
    """A valid prediction or a 4xx JSON error; nothing else."""
    assert status < 500, text[:500]
    assert content_type.startswith("application/json"), (status, content_type)
    body = json.loads(text)
    assert "Traceback" not in text
    if status == 200:
        predictions = body.get("predictions", [body])
        for p in predictions:
            assert 0 <= p["digit"] <= 9 and len(p["probabilities"]) == 10
            assert abs(sum(p["probabilities"]) - 1) < 1e-4 and np.all(np.isfinite(p["probabilities"]))
    else:
        assert 400 <= status < 500 and body["error"]["code"] and body["error"]["message"]


@pytest.mark.parametrize(("name", "content_type", "body"), BATTERY, ids=[c[0] for c in BATTERY])
def test_battery_through_the_app(client, name, content_type, body):
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/predict", data=body, headers=headers)
    check(r.status_code, r.content_type, r.get_data(as_text=True))


def test_battery_expectations(client):
    """A few of the battery's answers pinned down, so the battery cannot pass by accident."""
    outcomes = {}
    for name, content_type, body in BATTERY:
        headers = {"Content-Type": content_type} if content_type else {}
        outcomes[name] = client.post("/predict", data=body, headers=headers).status_code
    assert outcomes["bomb 20000x20000"] == outcomes["bomb 2^31x1"] == 413
    assert outcomes["random bytes"] == outcomes["truncated png"] == outcomes["png with bad crc"] == 400
    # Only the allowed formats are opened (service.imaging.FORMATS); the rest is a 415.
    for name in ("eps", "ico", "32-bit int", "float tiff"):
        assert outcomes[name] == 415, name
    for name in ("16-bit gray", "palette", "cmyk jpeg", "animated gif", "1x1", "10000x1", "1-bit", "webp"):
        assert outcomes[name] == 200, name
    assert outcomes["text/plain"] == outcomes["no content type"] == 415
    assert outcomes["json: deep nesting"] == outcomes["json: bools"] == outcomes["json: strings"] == 400


# --- property-based fuzzing ------------------------------------------------------------------

VALID = png_bytes(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)))


@FUZZ
@given(
    data=st.binary(max_size=4096),
    content_type=st.sampled_from(["image/png", "application/octet-stream", "image/gif"]),
)
def test_fuzz_random_bytes(client, data, content_type):
    r = client.post("/predict", data=data, headers={"Content-Type": content_type})
    check(r.status_code, r.content_type, r.get_data(as_text=True))


@FUZZ
@given(
    cut=st.integers(0, len(VALID)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), max_size=4),
)
def test_fuzz_truncated_and_mutated_png(client, cut, flips):
    data = bytearray(VALID)
    for i, x in flips:
        data[i] ^= x
    r = client.post(
        "/predict", data=bytes(data[:cut] if cut else data), headers={"Content-Type": "image/png"}
    )
    check(r.status_code, r.content_type, r.get_data(as_text=True))


@FUZZ
@given(
    mode=st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I", "I;16", "F", "CMYK"]),
    fmt=st.sampled_from(["PNG", "GIF", "BMP", "JPEG", "WEBP"]),
    w=st.integers(1, 300),
    h=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_valid_images_of_any_mode_and_size(client, mode, fmt, w, h, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode if mode not in ("I", "I;16", "F") else "L")
    if mode in ("I", "I;16", "F"):
        img = (
            img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
        )
    try:
        data = encode(img, fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format; nothing to send
    r = client.post("/predict", data=data, headers={"Content-Type": "image/*"})
    check(r.status_code, r.content_type, r.get_data(as_text=True))
    assert r.status_code == 200, r.get_json()  # every decodable image gets a prediction


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=30) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=60,
)


@settings(FUZZ, max_examples=50)
@given(
    doc=st.one_of(
        json_values,
        st.fixed_dictionaries({"image": json_values}),
        st.fixed_dictionaries({"instances": json_values}),
        st.fixed_dictionaries(
            {"image": st.lists(st.floats(-10, 300) | st.integers(-5, 260), min_size=784, max_size=784)}
        ),
        st.fixed_dictionaries(
            {
                "instances": st.lists(
                    st.lists(st.integers(0, 255), min_size=784, max_size=784), min_size=1, max_size=3
                )
            }
        ),
    )
)
def test_fuzz_json_shapes_and_types(client, doc):
    r = client.post("/predict", data=json.dumps(doc), headers={"Content-Type": "application/json"})
    check(r.status_code, r.content_type, r.get_data(as_text=True))


# --- against a real gunicorn: the workers survive ---------------------------------------------


@pytest.mark.slow
def test_workers_survive_the_battery(gunicorn, random_models_dir):
    server = gunicorn(random_models_dir)
    pids = server.workers()
    with requests.Session() as s:
        for name, content_type, body in BATTERY:
            headers = {"Content-Type": content_type} if content_type else {}
            r = s.post(server.url + "/predict", data=body, headers=headers, timeout=30)
            check(r.status_code, r.headers.get("Content-Type", ""), r.text)
            assert name
        rng = np.random.default_rng(5)
        for _ in range(100):  # a burst of random and mutated bodies too
            data = bytearray(VALID)
            data[rng.integers(0, len(data))] ^= int(rng.integers(1, 256))
            r = s.post(
                server.url + "/predict",
                data=bytes(data[: rng.integers(1, len(data) + 1)]),
                headers={"Content-Type": "image/png"},
                timeout=30,
            )
            check(r.status_code, r.headers.get("Content-Type", ""), r.text)
        assert s.get(server.url + "/healthz", timeout=10).status_code == 200
        assert (
            s.post(server.url + "/predict", data=VALID, headers={"Content-Type": "image/png"}).status_code
            == 200
        )
    assert server.workers() == pids, "a worker died or was replaced"
    assert "Traceback" not in server.logs() and "Exception" not in server.logs()

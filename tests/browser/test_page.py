"""The draw-a-digit page in headless Chromium: draw 1, 7, 0 with the mouse, clear, upload, the explanation,
pick a model, compare both; two viewports."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from core import mnist as mnist_files
from tests.helpers import ROOT, SHIPPED_VERSION, png_bytes

DESKTOP = {"width": 1200, "height": 800}
PHONE = {"width": 390, "height": 844}

# Strokes in canvas fractions (0..1): each is a list of points drawn with the mouse button held.
ONE = [[(0.50, 0.14), (0.50, 0.86)]]
SEVEN = [[(0.24, 0.18), (0.76, 0.18), (0.44, 0.86)]]
ZERO = [[(0.5 + 0.24 * math.sin(t), 0.5 - 0.34 * math.cos(t)) for t in np.linspace(0, 2 * math.pi, 25)]]


@pytest.fixture(params=["desktop", "phone"])
def page(request, browser, server):
    viewport = DESKTOP if request.param == "desktop" else PHONE
    context = browser.new_context(
        viewport=viewport,
        device_scale_factor=2 if request.param == "phone" else 1,
        has_touch=request.param == "phone",
    )
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_function(f"document.getElementById('version').textContent.includes('v{SHIPPED_VERSION}')")
    pg.viewport_name = request.param
    yield pg
    context.close()
    assert not errors, errors


def draw(page, strokes, steps: int = 6) -> None:
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        x0, y0 = stroke[0]
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=steps)
        page.mouse.up()


def shown_digit(page, expected: str) -> str:
    """The digit once the debounced prediction has landed (or whatever is shown after 10 s)."""
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function(
            f"document.getElementById('digit').textContent === '{expected}'", timeout=10_000
        )
    return page.locator("#digit").text_content()


def screenshot(page, path) -> None:
    page.wait_for_timeout(300)  # let the bars' width transition finish
    page.screenshot(path=str(path), full_page=True)


def bars(page) -> list[float]:
    return [float(t.rstrip("%")) for t in page.locator(".bar .pct").all_text_contents()]


@pytest.mark.parametrize(
    "name, strokes, expected", [("one", ONE, "1"), ("seven", SEVEN, "7"), ("zero", ZERO, "0")]
)
def test_drawn_digits_are_recognised(page, artifacts, name, strokes, expected):
    draw(page, strokes)
    assert shown_digit(page, expected) == expected
    probs = bars(page)
    assert len(probs) == 10 and probs.index(max(probs)) == int(expected)
    assert abs(sum(probs) - 100) < 1.5
    assert page.locator(".bar.top").get_attribute("data-digit") == expected
    screenshot(page, artifacts / f"{page.viewport_name}-{name}.png")
    if name == "seven" and os.environ.get("UPDATE_SCREENSHOTS") == "1":  # the README's pictures
        suffix = "" if page.viewport_name == "desktop" else "-phone"
        screenshot(page, ROOT / "docs" / f"screenshot{suffix}.png")


def test_clear_resets_the_page(page):
    draw(page, ONE)
    assert shown_digit(page, "1") == "1"
    page.click("#clear")
    assert page.locator("#digit").text_content() == "?"
    assert page.locator(".bar.top").count() == 0
    # The canvas is blank again: every pixel white.
    white = page.evaluate(
        """() => { const c = document.getElementById('pad');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   return d.every(v => v === 255); }"""
    )
    assert white


def test_upload_and_drop_a_png(page, artifacts, data_dir):
    mnist = mnist_files.load(data_dir)
    # Two MNIST test digits that differ, light on dark as MNIST stores them.
    first, second = 0, next(i for i in range(1, 100) if mnist.test_labels[i] != mnist.test_labels[0])
    label_a, label_b = str(mnist.test_labels[first]), str(mnist.test_labels[second])
    page.set_input_files(
        "#file",
        files=[{"name": "a.png", "mimeType": "image/png", "buffer": png_bytes(mnist.test_images[first])}],
    )
    assert shown_digit(page, label_a) == label_a
    assert page.locator("#preview").is_visible()

    payload = list(png_bytes(mnist.test_images[second]))
    page.evaluate(
        """(bytes) => {
             const dt = new DataTransfer();
             dt.items.add(new File([new Uint8Array(bytes)], 'b.png', {type: 'image/png'}));
             const zone = document.getElementById('drop');
             for (const type of ['dragenter', 'dragover', 'drop'])
               zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
           }""",
        payload,
    )
    assert shown_digit(page, label_b) == label_b
    screenshot(page, artifacts / f"{page.viewport_name}-upload.png")


def test_layout_is_tidy(page):
    """Nothing overflows sideways, the pad is square and large, and the result sits beside it or below it."""
    geometry = page.evaluate(
        """() => { const r = (id) => document.getElementById(id).getBoundingClientRect();
                   return {scroll: document.documentElement.scrollWidth, width: window.innerWidth,
                           pad: r('pad'), digit: r('digit'), bars: r('bars')}; }"""
    )
    assert geometry["scroll"] <= geometry["width"]
    pad, digit = geometry["pad"], geometry["digit"]
    assert abs(pad["width"] - pad["height"]) < 2
    if page.viewport_name == "desktop":
        assert pad["width"] >= 300 and digit["left"] > pad["right"]  # side by side
    else:
        assert pad["width"] >= 0.8 * geometry["width"] - 40 and digit["top"] > pad["bottom"]  # stacked
    assert geometry["bars"]["right"] <= geometry["width"]


def canvas_pixels(page, canvas_id: str) -> np.ndarray:
    """The 28×28 RGBA pixels of one of the explanation's canvases."""
    data = page.evaluate(
        "(id) => Array.from(document.getElementById(id).getContext('2d').getImageData(0, 0, 28, 28).data)",
        canvas_id,
    )
    return np.array(data, dtype=np.int64).reshape(28, 28, 4)


def test_explanation_is_shown_as_you_draw(page, artifacts):
    """The page shows the server's `input` exactly, and the saliency map's colours follow its signs."""
    answers = []
    page.on("response", lambda r: answers.append(r) if "/predict" in r.url else None)
    assert canvas_pixels(page, "seen")[..., :3].max() == 0  # black until the first answer
    draw(page, SEVEN)
    assert shown_digit(page, "7") == "7"
    page.wait_for_timeout(600)  # the last debounced answer has landed
    assert answers and all("explain=1" in r.url for r in answers)
    body = answers[-1].json()
    assert page.locator("#why").text_content() == f"Why {body['digit']}?"

    seen = canvas_pixels(page, "seen")
    want = np.rint(255 * np.array(body["input"]))
    for channel in range(3):
        np.testing.assert_array_equal(seen[..., channel], want)  # what the network saw, pixel for pixel
    assert want.max() == 255 and (want == 0).mean() > 0.5  # a centred light digit on black, as MNIST

    grad = np.array(body["saliency"])
    heat = canvas_pixels(page, "saliency")[..., :3]
    red, blue = np.array([208, 52, 44]), np.array([47, 111, 237])
    top = np.unravel_index(np.abs(grad).argmax(), grad.shape)
    np.testing.assert_allclose(heat[top], red if grad[top] > 0 else blue, atol=1)  # full colour at the peak
    for extreme, colour in ((grad.argmax(), "red"), (grad.argmin(), "blue")):
        at = np.unravel_index(extreme, grad.shape)
        if abs(grad[at]) > 0.5 * abs(grad[top]):
            r, _, b = heat[at]
            assert (r > b + 60) if colour == "red" else (b > r + 60), (colour, heat[at])
    small = np.abs(grad) < 0.02 * abs(grad[top])
    assert small.any()
    np.testing.assert_allclose(heat[small].max(axis=1) - heat[small].min(axis=1), 0, atol=8)  # faint: gray

    screenshot(page, artifacts / f"{page.viewport_name}-explain.png")
    if page.viewport_name == "desktop" and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        screenshot(page, ROOT / "docs" / "screenshot-explain.png")

    page.click("#clear")
    assert (
        canvas_pixels(page, "seen")[..., :3].max() == 0
        and canvas_pixels(page, "saliency")[..., :3].max() == 0
    )
    assert page.locator("#why").text_content() == "Why this digit?"


def test_model_picker_and_compare_view(page, artifacts):
    assert page.locator("#picker option").all_text_contents() == ["mnist", "mnist-seed"]
    draw(page, ONE)
    assert shown_digit(page, "1") == "1"
    assert page.locator("#version").text_content() == f"mnist v{SHIPPED_VERSION}"
    page.select_option("#picker", "mnist-seed")
    page.wait_for_function(
        "document.getElementById('version').textContent === 'mnist-seed v1'", timeout=10_000
    )

    page.check("#compare")
    page.wait_for_function("document.querySelectorAll('#compare-view .side').length === 2", timeout=10_000)
    tiles = page.locator("#compare-view .side")
    assert [tiles.nth(i).get_attribute("data-model") for i in range(2)] == ["mnist", "mnist-seed"]
    assert tiles.nth(0).locator(".who").text_content() == f"mnist v{SHIPPED_VERSION}"
    assert tiles.nth(1).locator(".who").text_content() == "mnist-seed v1"
    assert tiles.nth(0).locator(".d").text_content() == "1"
    assert tiles.nth(1).locator(".d").text_content() in list("0123456789")
    assert page.locator("#compare-view").is_visible()
    screenshot(page, artifacts / f"{page.viewport_name}-compare.png")
    page.uncheck("#compare")
    assert not page.locator("#compare-view").is_visible()

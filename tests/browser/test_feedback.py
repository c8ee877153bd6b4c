"""The page's feedback in headless Chromium: after an answer, correct it with one tap and see it kept;
say "right" with one tap; the record on disk is the drawing, the digit chosen and the answer given.
And on a server without FEEDBACK_DIR, the page says nothing was kept."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from core import feedback
from tests.browser.test_page import SEVEN, draw, screenshot
from tests.helpers import SHIPPED_VERSION, Server, start_gunicorn


@pytest.fixture(scope="module")
def fb_server(served_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    fb = tmp_path_factory.mktemp("feedback")
    with start_gunicorn(served_models, tmp_path_factory.mktemp("gunicorn-fb"), FEEDBACK_DIR=str(fb)) as s:
        yield s, fb


def open_page(browser, server: Server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function(f"document.getElementById('version').textContent.includes('v{SHIPPED_VERSION}')")
    return context, page, errors


def answered_digit(page) -> int:
    page.wait_for_selector("#feedback.on", timeout=10_000)
    page.wait_for_function("document.getElementById('digit').textContent !== '?'")
    return int(page.locator("#digit").text_content())


def test_correct_an_answer_and_see_it_kept(browser, fb_server, artifacts):
    server, fb = fb_server
    context, page, errors = open_page(browser, server)
    assert not page.locator("#feedback").is_visible()  # nothing to correct before an answer
    draw(page, SEVEN)
    predicted = answered_digit(page)
    assert "stored with your drawing" in page.locator("#kept").text_content()  # said before the tap
    assert page.locator(f"#fix button[data-digit='{predicted}']").is_disabled()  # it is not a correction
    chosen = (predicted + 1) % 10
    page.locator(f"#fix button[data-digit='{chosen}']").click()
    page.wait_for_selector("#kept.ok", timeout=10_000)
    kept = page.locator("#kept").text_content()
    assert kept.startswith(f"Kept, as {chosen}: record ")
    assert "your drawing as sent" in kept and "28×28" in kept
    assert page.locator("#right").is_disabled()  # one answer, one record
    screenshot(page, artifacts / "desktop-feedback.png")

    [event] = list(feedback.read_events(fb))
    assert event["id"].startswith(kept.split("record ")[1][:8])
    d = event["data"]
    assert d["digit"] == chosen and d["predicted"] == predicted and d["correct"] is False
    assert d["scored"]["digit"] == predicted  # the service scored the same drawing the same way
    assert d["model"] == {"name": "mnist", "version": SHIPPED_VERSION}
    assert d["request_id"]  # the /predict answer's X-Request-ID
    drawing = Image.open(io.BytesIO(base64.b64decode(d["image"]["base64"])))
    assert drawing.size == (280, 280)  # the canvas itself, as drawn

    # Another stroke is a new answer: "right" is one tap.
    draw(page, [[(0.3, 0.6), (0.45, 0.62)]])
    page.wait_for_function("!document.getElementById('right').disabled", timeout=10_000)
    again = answered_digit(page)
    page.locator("#right").click()
    page.wait_for_selector("#kept.ok", timeout=10_000)
    events = list(feedback.read_events(fb))
    assert len(events) == 2
    assert events[1]["data"]["digit"] == events[1]["data"]["predicted"] == again
    assert events[1]["data"]["correct"] is (events[1]["data"]["scored"]["digit"] == again)
    for line in b"".join(p.read_bytes() for p in feedback.feedback_files(fb)).splitlines():
        json.loads(line)

    # Clear withdraws the question.
    page.locator("#clear").click()
    assert not page.locator("#feedback").is_visible()
    context.close()
    assert not errors, errors


def test_without_feedback_dir_the_page_says_nothing_was_kept(browser, server):
    context, page, errors = open_page(browser, server)
    draw(page, SEVEN)
    answered_digit(page)
    page.locator("#right").click()
    page.wait_for_selector("#kept.error", timeout=10_000)
    assert "Not kept: this server does not store feedback" in page.locator("#kept").text_content()
    assert not page.locator("#right").is_disabled()  # it can be tried again
    context.close()
    assert not errors, errors

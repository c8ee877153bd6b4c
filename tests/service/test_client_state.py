"""What a client sends cannot grow the server's state or forge its output, through a real gunicorn.

Made-up HTTP methods leave the metrics' series as they are; a path with CR/LF
cannot forge a text-mode log line; a version with a trailing newline, deeply
nested JSON and an oversized declared batch are the routes' own 4xx JSON.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from collections.abc import Iterator

import pytest
import requests

from core.settings import Settings
from tests.helpers import Server, png_bytes, publish, random_net, start_gunicorn


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("state") / "models"
    publish(d, random_net())
    with start_gunicorn(d, tmp_path_factory.mktemp("gunicorn"), LOG_FORMAT="text") as s:
        yield s


def _series(url: str) -> set[str]:
    """Every sample line of /metrics without its value: one entry per series."""
    text = requests.get(url + "/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def _methods(n: int) -> list[str]:
    """n distinct made-up methods gunicorn accepts (upper-case letters, 5 of them)."""
    letters = itertools.product(string.ascii_uppercase, repeat=3)
    return ["XQ" + "".join(t) for t in itertools.islice(letters, n)]


@pytest.mark.slow
def test_hundreds_of_unknown_methods_leave_the_metric_series_unchanged(server):
    with requests.Session() as s:
        for method in _methods(8):  # every worker has met one: the "other" series exist
            for path in ("/predict", "/healthz", "/nowhere"):
                s.request(method, server.url + path, timeout=10)
        _series(server.url)  # a scrape is a request too: its own series exist from now on
        before = _series(server.url)
        answers = set()
        for method in _methods(400)[8:]:
            for path in ("/predict", "/healthz", "/nowhere"):
                r = s.request(method, server.url + path, timeout=10)
                answers.add((r.status_code, r.headers["Content-Type"]))
        after = _series(server.url)
    assert answers <= {(405, "application/json"), (404, "application/json")}, answers
    assert len(after) == len(before), sorted(after - before)[:10]
    assert any('method="other"' in line for line in after)


@pytest.mark.slow
def test_a_path_with_cr_lf_cannot_forge_a_text_log_line(server):
    forged = "1999-01-01 00:00:00,000 INFO [1] access: forged"
    path = "/nowhere%0D%0A" + requests.utils.quote(forged)
    r = requests.get(server.url + path, timeout=10)
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
    lines = server.lines()
    assert not any(line.startswith("1999-01-01") for line in lines), [ln for ln in lines if "forged" in ln]
    assert any("\\r\\n1999-01-01" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "v2"),
    [
        ("/predict?version=1%0A", png_bytes([[0] * 28] * 28), "image/png", 400, False),
        ("/v2/models/mnist/versions/1%0A/infer", b"{}", "application/json", 400, True),
        (
            "/v2/models/mnist/infer",
            b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "application/json",
            400,
            True,
        ),
        ("/v2/repository/index", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, True),
        ("/predict", b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, False),
        (
            "/v2/models/mnist/infer",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "datatype": "UINT8",
                            "shape": [Settings().max_batch + 1, 784],
                            "data": [],
                        }
                    ]
                }
            ).encode(),
            "application/json",
            413,
            True,
        ),
    ],
    ids=[
        "version-newline",
        "v2-version-newline",
        "v2-nested",
        "v2-index-nested",
        "predict-nested",
        "v2-batch",
    ],
)
def test_bad_input_is_the_routes_own_4xx_json(server, path, body, content_type, status, v2):
    r = requests.post(server.url + path, data=body, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == status and r.headers["Content-Type"] == "application/json", (
        r.status_code,
        r.text[:300],
    )
    error = r.json()["error"]
    assert isinstance(error, str) if v2 else re.fullmatch(r"[a-z_]+", error["code"]), error

"""service.gunicorn_response: a response leaves in one send, so a replica killed mid-answer has
sent nothing nginx could not retry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi

from service.gunicorn_response import OneSendResponse


class RecordingSocket:
    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def respond(method: str, status: str, headers: list[tuple[str, str]], body: list[bytes]) -> list[bytes]:
    sock = RecordingSocket()
    req = SimpleNamespace(version=(1, 1), method=method, should_close=lambda: False)
    resp = OneSendResponse(req, sock, Config())
    resp.start_response(status, headers)
    for chunk in body:
        resp.write(chunk)
    resp.close()
    return sock.sends


def test_headers_and_body_leave_in_one_send() -> None:
    body = b'{"digit":7}'
    sends = respond(
        "POST", "200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")], [body]
    )
    assert len(sends) == 1
    head, sent_body = sends[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 11" in head
    assert sent_body == body


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "204 No Content")])
def test_a_response_without_body_still_sends_its_headers(method: str, status: str) -> None:
    sends = respond(method, status, [("Content-Length", "0")], [])
    assert len(sends) == 1 and sends[0].startswith(f"HTTP/1.1 {status}".encode())
    assert sends[0].endswith(b"\r\n\r\n")


def test_a_streamed_body_keeps_its_order() -> None:
    sends = respond("GET", "200 OK", [("Content-Type", "text/plain")], [b"a", b"b"])
    wire = b"".join(sends)
    assert wire.index(b"HTTP/1.1 200 OK") == 0
    assert wire.endswith(b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n")  # chunked: no Content-Length given


def test_install_replaces_the_class_gunicorn_builds_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import gunicorn_response

    monkeypatch.setattr(wsgi, "Response", wsgi.Response)
    gunicorn_response.install()
    assert wsgi.Response is OneSendResponse


def test_gunicorns_request_path_builds_the_installed_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn's workers call `wsgi.create`, which must build `wsgi.Response` as it finds it at
    request time: a gunicorn that stops doing so would silently send headers and body apart again,
    so this fails loudly on such an upgrade (the class was checked against requirements/service.txt's
    gunicorn)."""
    from gunicorn.http.parser import RequestParser

    from service import gunicorn_response

    monkeypatch.setattr(wsgi, "Response", wsgi.Response)
    gunicorn_response.install()
    cfg = Config()
    raw = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    req = next(RequestParser(cfg, iter([raw]), ("127.0.0.1", 5000)))
    resp, environ = wsgi.create(req, RecordingSocket(), ("127.0.0.1", 5000), ("127.0.0.1", 8000), cfg)
    assert type(resp) is OneSendResponse
    assert environ["PATH_INFO"] == "/predict"

"""service/gevent_worker.py, the default worker class, in a real gunicorn.

Its other changes are tested where they matter: native threads beside the
hub let tests/service/test_grpc.py::test_term_lets_in_flight_calls_finish
pass under it (with `threading` patched too, the calls grpc had received but
not yet matched were cancelled at TERM), and paced accepts spread clients
that connect together over the workers
(tests/service/test_gunicorn.py::test_keep_alive_clients_spread_over_both_workers).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from tests.helpers import png_bytes

PIPELINED = 40


def _request(host: str, body: bytes) -> bytes:
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def _read_responses(sock: socket.socket, n: int, arrivals: list[float]) -> None:
    """Reads n responses (each with a Content-Length) and notes when each one was complete."""
    buf = b""
    while len(arrivals) < n:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\r\n\r\n" in buf:
            head, rest = buf.split(b"\r\n\r\n", 1)
            field = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
            length = int(field.split(b":")[1])
            if len(rest) < length:
                break
            assert head.startswith(b"HTTP/1.1 200"), head
            buf = rest[length:]
            arrivals.append(time.monotonic())


def test_a_pipelining_client_does_not_hold_the_worker(gunicorn, random_models_dir):
    """One worker; client A sends 40 /predict at once on its connection, then client B sends one.

    Without a yield after each response, A's greenlet finds its next request already buffered and
    serves all 40 before B's greenlet runs; with it, B is answered after a few of A's."""
    server = gunicorn(random_models_dir, WEB_CONCURRENCY="1")
    host = server.url.removeprefix("http://")
    address = (host.split(":")[0], int(host.split(":")[1]))
    body = png_bytes(np.zeros((28, 28), np.uint8))
    a, b = socket.create_connection(address), socket.create_connection(address)
    try:
        b.sendall(_request(host, body))  # connected and warm: B's greenlet is waiting for its next request
        _read_responses(b, 1, [])
        a_done: list[float] = []
        reader = threading.Thread(target=_read_responses, args=(a, PIPELINED, a_done))
        reader.start()
        a.sendall(_request(host, body) * PIPELINED)
        while not a_done:  # A is being served
            time.sleep(0.0005)
        b.sendall(_request(host, body))
        b_done: list[float] = []
        _read_responses(b, 1, b_done)
        reader.join(30)
    finally:
        a.close()
        b.close()
    assert len(a_done) == PIPELINED
    before_b = sum(t < b_done[0] for t in a_done)
    assert before_b < PIPELINED / 2, f"{before_b} of A's {PIPELINED} answers came before B's one"

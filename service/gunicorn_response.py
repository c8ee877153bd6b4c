"""gunicorn's HTTP/1 response, with the status line, headers and first body bytes in one send.

gunicorn sends a response's headers, then its body, in two writes. A replica
killed between the two (a crash, an OOM kill, `docker kill`) leaves nginx with
the headers of an answer that never completes: nginx can no longer retry it on
another replica, and its client gets a truncated response. Our answers are a
few hundred bytes, so with one send per response a killed replica has sent
either everything or nothing, and nothing is what `proxy_next_upstream`
retries.

`install()` is called by gunicorn.conf.py in the master, before workers fork.
gunicorn looks `Response` up in `gunicorn.http.wsgi` for every request; the
class below changes only when the header bytes are written, not what they are.
File responses go through the same path because gunicorn.conf.py turns
sendfile off.
"""

from __future__ import annotations

from gunicorn import util
from gunicorn.http import wsgi


class OneSendResponse(wsgi.Response):
    """Holds the header block back until the first body bytes (or the end) and sends both at once."""

    _held: bytes = b""

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._held = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True

    def _flush_held(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _emit_body(self, data: bytes) -> None:
        held = self._flush_held()
        if self.chunked:
            if held:
                self.sock.sendall(held)
            util.write_chunk(self.sock, data)
        else:
            self.sock.sendall(held + data)

    def close(self) -> None:
        if not self.headers_sent:
            self.send_headers()
        held = self._flush_held()
        if held:
            self.sock.sendall(held)
        super().close()


def install() -> None:
    wsgi.Response = OneSendResponse

"""gunicorn's gevent worker: on a host, in a pod, and in each replica behind nginx.

One thread serves every connection of a worker as a greenlet, so a request
costs no hand-off between threads: with gthread the main thread's poller
passes each request to a pool thread and gets it back (futex wake-ups,
about a seventh of a worker's CPU under load, docs/benchmarks.md).

Three changes to gunicorn's own `GeventWorker`:

- **Threads stay threads.** The standard library is patched as gunicorn
  does, except `threading`: the gRPC server (service/grpc_server.py) keeps
  its native threads, so a TERM drains its in-flight calls as under gthread.
  Under a patched `threading`, grpc matches calls through a greenlet that a
  computing handler holds off, and stopping the server cancels the calls it
  has received but not yet matched. The model poller and prometheus'
  locks are native too; none of them waits on the network while it holds a
  lock, so no greenlet can block the hub through one.
- **Each connection takes its turn.** After every response the greenlet
  waits for the event loop to go idle (`gevent.idle()`), so the other
  connections' ready requests are read and served first. Without it a
  keep-alive client whose next request is already buffered keeps the worker
  while its other connections wait: a client pipelining 40 requests had all
  40 answered before another client's one (tests/service/test_gevent_worker.py).
  `gevent.sleep(0)` is not enough: it lets other greenlets run but does not
  poll for I/O, so the waiting connections are never seen.
- **Connections spread over the workers.** After each new connection a worker
  pauses accepting for half a millisecond per connection it holds, so that
  clients connecting together reach every worker (`_PacedServer`).

`GUNICORN_WORKER_CLASS=gevent` selects it (gunicorn.conf.py, the default); behind
nginx each replica runs one such worker (docs/deploy.md).
"""

from __future__ import annotations

from typing import Any

import gevent
from gevent import monkey, socket
from gevent.server import StreamServer
from gunicorn.workers import ggevent

ACCEPT_PAUSE = 0.0005  # seconds, per connection it holds, a worker sharing its socket waits to accept


class _PacedServer(StreamServer):
    """After each new connection, stops accepting for ACCEPT_PAUSE per connection it holds.

    gunicorn has a worker that shares the socket accept one connection per wake-up
    (`max_accept = 1`), but an idle worker wakes again at once: 8 clients connecting together
    could all land on one worker, the other core idle (tests/service/test_gunicorn.py). The
    more connections a worker holds, the longer the others have to take the next one: a rough
    least-connections. A worker that is computing does not accept anyway, and a client that
    opens a connection per request finds the worker holding one or none.
    """

    def do_handle(self, *args: Any) -> None:
        super().do_handle(*args)
        if self.max_accept == 1 and self.pool is not None:
            held = self.pool.size - self.pool.free_count()
            self.stop_accepting()
            # gevent's own way back to accepting after a pause (its delay after accept errors)
            self._timer = self.loop.timer(ACCEPT_PAUSE * held)
            self._timer.start(self._start_accepting_if_started)


class GeventWorker(ggevent.GeventWorker):
    def patch(self) -> None:
        monkey.patch_all(thread=False, queue=False)  # the thread pools keep their own queues
        # As gunicorn's own patch(): the inherited listeners become gevent sockets.
        self.sockets = [
            socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets
        ]

    def run(self) -> None:
        ggevent.StreamServer = _PacedServer  # gunicorn's run() builds its servers from this name
        super().run()

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            gevent.idle()

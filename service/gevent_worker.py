"""gunicorn's gevent worker, for a host where clients reach gunicorn directly.

One thread serves every connection of a worker as a greenlet, so a request
costs no hand-off between threads: with gthread the main thread's poller
passes each request to a pool thread and gets it back (futex wake-ups,
about a seventh of a worker's CPU under load, docs/benchmarks.md).

Two changes to gunicorn's own `GeventWorker`, both for what runs beside the
HTTP server in the same process:

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

`GUNICORN_WORKER_CLASS=gevent` selects it (gunicorn.conf.py); behind nginx
the replicas run gthread (docs/deploy.md).
"""

from __future__ import annotations

from typing import Any

import gevent
from gevent import monkey, socket
from gunicorn.workers import ggevent


class GeventWorker(ggevent.GeventWorker):
    def patch(self) -> None:
        monkey.patch_all(thread=False, queue=False)  # the thread pools keep their own queues
        # As gunicorn's own patch(): the inherited listeners become gevent sockets.
        self.sockets = [
            socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets
        ]

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            gevent.idle()

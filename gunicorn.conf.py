"""gunicorn settings for the inference service: `gunicorn -c gunicorn.conf.py service.wsgi:app`.

Environment (default):

    PORT                      8000       bind 0.0.0.0:$PORT
    WEB_CONCURRENCY           2          worker processes (one per core)
    GUNICORN_WORKER_CLASS     gthread    beat sync in the README benchmark; keeps connections alive
    GUNICORN_THREADS          4          threads per gthread worker (slow clients do not block a worker)
    GUNICORN_WORKER_CONNECTIONS threads+1 connections one worker holds at once (1000 for a lone
                                         worker); see below
    GUNICORN_TIMEOUT          30         seconds before a stuck worker is killed and replaced
    GUNICORN_GRACEFUL_TIMEOUT 20         seconds in-flight requests get on TERM / HUP
    GUNICORN_KEEPALIVE        5          seconds an idle keep-alive connection stays open
    GUNICORN_TMP_DIR          /dev/shm   worker heartbeat files (a tmpfs: the rootfs may be read-only)
    GUNICORN_CONTROL_SOCKET   (off)      path for gunicornc's control socket
    GUNICORN_ACCESS_LOG       (off)      gunicorn's own access log ("-" = stdout); the app already
                                         writes one JSON access line per request (service/logs.py)
    LOG_LEVEL                 info
    PROMETHEUS_MULTIPROC_DIR  (fresh temp dir) where workers share metrics; wiped at start
    GRPC_PORT                 8001       the Open Inference Protocol over gRPC on 0.0.0.0:$GRPC_PORT
                                         (Triton's port), every worker on it with SO_REUSEPORT; 0 = off
    GRPC_THREADS              4          threads per worker's gRPC server
    GRPC_MAX_CONCURRENT_RPCS  64         gRPC calls one worker holds at once; beyond, RESOURCE_EXHAUSTED
    GRPC_GRACE_SECONDS        10         seconds in-flight gRPC calls get on TERM (< GRACEFUL_TIMEOUT)

The gRPC server (service/grpc_server.py) is started by each worker in
`post_worker_init` and stopped in `worker_exit`: grpc is never imported in the
master, since its threads do not survive fork.

This module runs in the master before any worker is forked, so the thread
limits set here reach numpy in every worker: one BLAS thread per worker, since
the workers themselves already use the cores.
"""

import os
import shutil
import tempfile

# gunicorn puts its working directory (--chdir, default the current one) on sys.path before it
# reads this file, so the project's packages import here as they do in the image's /app.
from core.threads import pin_blas_threads

pin_blas_threads(1)

from service.logs import GunicornLogger, gunicorn_logconfig  # noqa: E402 - after the thread settings


def _tmp_base() -> str | None:
    if os.environ.get("GUNICORN_TMP_DIR"):
        return os.environ["GUNICORN_TMP_DIR"]
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _int_env(name: str, default: int, minimum: int) -> int:
    """An integer setting, or a stop that names the variable (not a traceback, not a silent hang:
    GUNICORN_WORKER_CONNECTIONS=0 would leave every worker refusing to accept)."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise SystemExit(f"gunicorn.conf.py: {name}={text!r}: expected an integer >= {minimum}")
    return value


wsgi_app = "service.wsgi:app"
# Read here so a bad value stops the start; used by the workers' hooks below.
_grpc = {
    "port": _int_env("GRPC_PORT", 8001, 0),
    "threads": _int_env("GRPC_THREADS", 4, 1),
    "max_concurrent_rpcs": _int_env("GRPC_MAX_CONCURRENT_RPCS", 64, 1),
    "grace_seconds": _int_env("GRPC_GRACE_SECONDS", 10, 0),
}
bind = [f"0.0.0.0:{_int_env('PORT', 8000, 1)}"]
workers = _int_env("WEB_CONCURRENCY", 2, 1)
worker_class = os.environ.get("GUNICORN_WORKER_CLASS") or "gthread"
threads = _int_env("GUNICORN_THREADS", 4, 1)
# A gthread worker accepts every connection it can, so keep-alive clients that connect
# together (a load balancer's pool, a benchmark) can all land on one worker while the other
# core idles: with 2 workers on 2 cores /predict ran at ~620 req/s in such runs, ~1300 otherwise.
# With several workers, holding at most threads+1 connections per worker sends the rest to the
# other workers, and beyond one parked keep-alive a worker answers "Connection: close", so
# clients reconnect and spread again. A lone worker (one per replica behind nginx, which balances
# the replicas itself) has no one to share with: it keeps every connection nginx reuses.
worker_connections = _int_env("GUNICORN_WORKER_CONNECTIONS", threads + 1 if workers > 1 else 1000, 1)
# nginx refuses oversized requests first, with JSON (large_client_header_buffers 4 4k in
# deploy/nginx/nginx.conf: 414 for the request line, 431 for headers): gunicorn's own limits sit
# above nginx's, so its plain-text 400 never reaches a client through nginx.
limit_request_line = 8190  # gunicorn's maximum; nginx's: a line within 4 KiB
limit_request_field_size = 8190  # nginx's: a header line within 4 KiB
limit_request_fields = 4096  # nginx's 4 x 4 KiB of headers hold fewer (under 1000 in a test)
timeout = _int_env("GUNICORN_TIMEOUT", 30, 0)
graceful_timeout = _int_env("GUNICORN_GRACEFUL_TIMEOUT", 20, 0)
keepalive = _int_env("GUNICORN_KEEPALIVE", 5, 0)
worker_tmp_dir = _tmp_base()
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "") or None
errorlog = "-"
# gunicorn's own lines as JSON too, through the app's formatter (LOG_FORMAT=text for humans).
logconfig_dict = gunicorn_logconfig()
logger_class = GunicornLogger  # no access atoms built for lines nobody writes

# One send per response, so that nginx can retry any request a killed replica did not answer
# (service/gunicorn_response.py); file responses take the same path.
from service import gunicorn_response  # noqa: E402

gunicorn_response.install()
sendfile = False
loglevel = os.environ.get("LOG_LEVEL", "info")
capture_output = False
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl), which
# several servers on one machine would fight over and a read-only rootfs cannot hold: off unless asked.
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
# Behind a proxy (Docker, k8s) X-Forwarded-* come from it.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

# prometheus_client multiprocess mode needs a directory shared by all workers,
# set before any worker imports prometheus_client.
# The marker survives a HUP, which re-reads this file with the variable already set.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-", dir=_tmp_base())
    os.environ["GUNICORN_OWNS_PROMETHEUS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_starting(server):
    """Wipe metrics left by a previous run: stale files would be counted again."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    for entry in os.scandir(path):
        if entry.is_file():
            os.unlink(entry.path)


def post_worker_init(worker):
    """Start the model poller as the worker boots, not at its first request.

    A worker that gets no traffic for a while must still follow new versions and labels.
    """
    registry = getattr(worker.wsgi, "extensions", {}).get("registry")  # every model's poller
    if registry is not None:
        registry.ensure_polling()
    if registry is not None and _grpc["port"]:
        # Imported here, in the worker: grpc must not be initialised before the fork.
        from service import grpc_server

        grpc_server.attach(worker, grpc_server.Settings(**_grpc))


def worker_exit(server, worker):
    """Let in-flight gRPC calls finish (the SIGTERM handler already refused new ones)."""
    if getattr(worker, "grpc_server", None) is not None:
        from service import grpc_server

        grpc_server.detach(worker)


def child_exit(server, worker):
    """A dead worker's live gauges must not be summed any more."""
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    owned = os.environ.get("GUNICORN_OWNS_PROMETHEUS_DIR")
    if owned and owned == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(owned, ignore_errors=True)

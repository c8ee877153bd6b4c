"""gunicorn settings for the inference service: `gunicorn -c gunicorn.conf.py service.wsgi:app`.

Every setting it reads (PORT, WEB_CONCURRENCY, GUNICORN_*, GRPC_*, LOG_LEVEL, ...) is
declared, with its default and check, in core/settings.py (the table: docs/settings.md),
and read once here: a malformed value stops the start with one line naming it.

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

from core.settings import Settings, SettingsError  # noqa: E402
from service.logs import GunicornLogger, gunicorn_logconfig  # noqa: E402 - after the thread settings

try:
    # Every setting is checked here, in the master, so a bad one stops the start with one line
    # (not a traceback, not a silent hang: GUNICORN_WORKER_CONNECTIONS=0 would leave every worker
    # refusing to accept), before any worker boots.
    settings = Settings.from_env()
except SettingsError as e:
    raise SystemExit(f"gunicorn.conf.py: {e}") from None


def _tmp_base() -> str | None:
    if settings.gunicorn_tmp_dir:
        return settings.gunicorn_tmp_dir
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


GEVENT_CONNECTIONS = 64

wsgi_app = "service.wsgi:app"
bind = [f"0.0.0.0:{settings.port}"]
workers = settings.web_concurrency
# gevent (the default): every connection of a worker is a greenlet of its one thread, so a
# request costs no hand-off between threads; gunicorn's own gevent worker with three changes,
# service/gevent_worker.py. Behind nginx each replica runs one gevent worker (docs/deploy.md).
# `gthread` and `sync` also work.
worker_class = {"gevent": "service.gevent_worker.GeventWorker"}.get(
    settings.gunicorn_worker_class, settings.gunicorn_worker_class
)
# Threads are gthread's alone: gunicorn would turn a sync worker with threads > 1 into gthread.
threads = settings.gunicorn_threads if settings.gunicorn_worker_class == "gthread" else 1
# A gthread worker accepts every connection it can, so keep-alive clients that connect
# together (a load balancer's pool, a benchmark) can all land on one worker while the other
# core idles: with 2 workers on 2 cores /predict ran at ~620 req/s in such runs, ~1300 otherwise.
# With several workers, holding at most threads+1 connections per worker sends the rest to the
# other workers, and beyond one parked keep-alive a worker answers "Connection: close", so
# clients reconnect and spread again. A lone worker (one per replica behind nginx, which balances
# the replicas itself) has no one to share with: it keeps every connection nginx reuses.
# A gevent worker that is computing does not accept, so the others take new connections. Its
# greenlets read bodies side by side (one computes at a time), so its 64 connections bound the
# bodies it holds to 64 x MAX_CONTENT_LENGTH.
if settings.gunicorn_worker_connections:
    worker_connections = settings.gunicorn_worker_connections
elif settings.gunicorn_worker_class == "gevent":
    worker_connections = GEVENT_CONNECTIONS
elif workers > 1:
    worker_connections = threads + 1
else:
    worker_connections = 1000
# nginx refuses oversized requests first, with JSON (large_client_header_buffers 4 4k in
# deploy/nginx/nginx.conf: 414 for the request line, 431 for headers): gunicorn's own limits sit
# above nginx's, so its plain-text 400 never reaches a client through nginx.
limit_request_line = 8190  # gunicorn's maximum; nginx's: a line within 4 KiB
limit_request_field_size = 8190  # nginx's: a header line within 4 KiB
limit_request_fields = 4096  # nginx's 4 x 4 KiB of headers hold fewer (under 1000 in a test)
timeout = settings.gunicorn_timeout
graceful_timeout = settings.gunicorn_graceful_timeout
keepalive = settings.gunicorn_keepalive
worker_tmp_dir = _tmp_base()
accesslog = settings.gunicorn_access_log
errorlog = "-"
# gunicorn's own lines as JSON too, through the app's formatter (LOG_FORMAT=text for humans).
logconfig_dict = gunicorn_logconfig(settings)
logger_class = GunicornLogger  # no access atoms built for lines nobody writes

# One send per response, so that nginx can retry any request a killed replica did not answer
# (service/gunicorn_response.py); file responses take the same path.
from service import gunicorn_response  # noqa: E402

gunicorn_response.install()
sendfile = False
loglevel = settings.log_level
capture_output = False
# gunicorn's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl), which
# several servers on one machine would fight over and a read-only rootfs cannot hold: off unless asked.
control_socket_disable = settings.gunicorn_control_socket is None
if settings.gunicorn_control_socket is not None:
    control_socket = settings.gunicorn_control_socket
# Whose X-Forwarded-Proto gunicorn believes; the app's TRUSTED_PROXIES covers the client address.
forwarded_allow_ips = settings.forwarded_allow_ips

# prometheus_client multiprocess mode needs a directory shared by all workers, and reads it
# from the environment: a fresh one is put there before any worker imports prometheus_client.
# The marker (not a setting) survives a HUP, which re-reads this file with the variable set.
if not settings.prometheus_multiproc_dir:
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
    if registry is not None and settings.grpc_port:
        # Imported here, in the worker: grpc must not be initialised before the fork.
        from service import grpc_server

        grpc_server.attach(worker, settings)
    # The last step before the worker takes connections: tests (and operators) wait for this line.
    worker.log.info("Worker ready (pid: %s)", worker.pid)


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

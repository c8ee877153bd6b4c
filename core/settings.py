"""Every setting of the project in one frozen dataclass: its name, default, check and meaning.

Each setting is an environment variable. The service (service/app.py),
gunicorn.conf.py, the logs (service/logs.py), the release CLI
(core/release.py) and the trainer read them through `Settings.from_env()`,
so a name means one thing, has one default and is checked one way
everywhere: `MIN_ACCURACY=98` stops the service and the release CLI alike.

The class is also the reference the rest is held to: docs/settings.md is
generated from it (`make settings-doc`, or `python -m core.settings`), and
tests/deploy/test_settings_agree.py checks .env.example, docker-compose.yml,
the Swarm stack and the Kubernetes manifests against it.

Only the standard library and core.names are imported: the trainer reads
TRAINER_THREADS before numpy is imported (numpy fixes its BLAS thread count
at import).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core.names import check_name, parse_version

# The choices of PROMOTION (core.promotion applies them) and ACCESS_LOG (service.logs).
PROMOTION_POLICIES = ("gate", "latest", "manual")
ACCESS_LOG_CHOICES = ("1", "errors", "0")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "text")

# The groups of docs/settings.md, in order.
GROUPS = ("Service", "Feedback", "Logs", "gunicorn", "gRPC", "Trainer")


class SettingsError(ValueError):
    """A malformed setting. The message names the variable, so a bad value stops the start
    with one line that says what to fix, rather than a confusing error on some later request."""


# A check takes the setting's name and its raw value (text from the environment, or an already
# typed override from a test) and returns the typed value, or raises SettingsError.
Check = Callable[[str, Any], Any]


def _refuse(name: str, value: Any, expected: str) -> SettingsError:
    return SettingsError(f"{name}={value!r}: expected {expected}")


def _integer(minimum: int) -> Check:
    def check(name: str, value: Any) -> int:
        try:
            number = value if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            number = None
        if number is None or isinstance(value, bool) or number < minimum:
            raise _refuse(name, value, f"an integer >= {minimum}")
        return number

    return check


def _float(value: Any) -> float:
    """`value` as a float; NaN for what is no number (a boolean among them), which every range refuses."""
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def _number(name: str, value: Any) -> float:
    """A non-negative, finite float (seconds)."""
    number = _float(value)
    if not (math.isfinite(number) and number >= 0):
        raise _refuse(name, value, "a positive number or 0")
    return number


def _fraction(name: str, value: Any) -> float:
    """A float from 0 to 1: an accuracy, never a percentage."""
    number = _float(value)
    if not 0 <= number <= 1:
        raise _refuse(name, value, "a positive fraction from 0 to 1 (0.98 = 98%)")
    return number


def _choice(options: tuple[str, ...]) -> Check:
    def check(name: str, value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise SettingsError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return text

    return check


def _flag(name: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _refuse(name, value, "1 or 0 (true/false, yes/no, on/off)")


def _optional(check: Check) -> Check:
    """`check`, or None (a default computed where it is used) when unset."""

    def optional(name: str, value: Any) -> Any:
        return None if value in (None, "") else check(name, value)

    return optional


def _text(name: str, value: Any) -> str:
    return str(value)


def _optional_text(name: str, value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _model_name(name: str, value: Any) -> str:
    try:
        return check_name(value)
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None


def _model_names(name: str, value: Any) -> tuple[str, ...] | None:
    """Comma-separated names (or a sequence); None, meaning every folder, when empty."""
    if value in (None, ""):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in items if str(n).strip()]
    try:
        return tuple(check_name(n) for n in names) or None
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None


def _model_version(name: str, value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return parse_version(value)
    except ValueError as e:
        raise SettingsError(f"{name}: {e}") from None


def _setting(default: Any, check: Check, doc: str, group: str, deploy: bool = False, shown: str = "") -> Any:
    """One field: its default, its check, a line of docs, and its group in docs/settings.md.

    `deploy` marks the settings that compose and Swarm pass from `.env` (or the shell) into the
    containers and the Kubernetes manifests set: the ones an operator is expected to change.
    `shown` is the default as docs/settings.md states it, when the value alone says too little.
    """
    assert group in GROUPS, group
    meta = {"check": check, "doc": doc, "group": group, "deploy": deploy, "shown": shown}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Every setting, typed and checked. Field `max_batch` is the variable `MAX_BATCH`.

    Build it with `Settings.from_env()`; `Settings()` is every default. A value given to the
    constructor or to `dataclasses.replace` goes through the same check as one from the
    environment, so no instance holds an unchecked value.
    """

    # --- Service -------------------------------------------------------------------------------
    models_dir: str = _setting(
        "./models",
        _text,
        "The model repository, `<name>/<version>/` folders (the trainer's output too).",
        "Service",
    )
    model_name: str = _setting(
        "mnist",
        _model_name,
        "The default model (of `/predict`, `/readyz`) and the one trained. Letters, digits, `_ - .`.",
        "Service",
        deploy=True,
    )
    model_names: tuple[str, ...] | None = _setting(
        None,
        _model_names,
        "Models served, comma-separated. Unset: every folder under `MODELS_DIR`, new ones picked up "
        "live; `MODEL_NAME` is always served.",
        "Service",
        deploy=True,
    )
    model_version: int | None = _setting(
        None,
        _model_version,
        "Pin one version of `MODEL_NAME`, above labels and the promotion policy. Unset: the policy decides.",
        "Service",
        deploy=True,
    )
    promotion: str = _setting(
        "gate",
        _choice(PROMOTION_POLICIES),
        "Which new version goes live: `gate` (the accuracy checks below), `latest` (every new valid "
        "version), `manual` (only by `make promote`). [lifecycle.md](lifecycle.md)",
        "Service",
        deploy=True,
    )
    min_accuracy: float = _setting(
        0.98,
        _fraction,
        "`gate`: least recorded test accuracy, a fraction from 0 to 1, for a version to replace the "
        "serving one. A model's first version serves whatever its accuracy.",
        "Service",
        deploy=True,
    )
    promotion_tolerance: float = _setting(
        0.001,
        _fraction,
        "`gate`: how far below the serving version's accuracy a new one may be (0.001 = 0.1 "
        "percentage points).",
        "Service",
        deploy=True,
    )
    model_poll_seconds: float = _setting(
        5.0,
        _number,
        "How often each worker rescans the repository for new versions and labels. `0`: never.",
        "Service",
        deploy=True,
    )
    max_batch: int = _setting(1024, _integer(1), "Most images in one request (413 beyond).", "Service", True)
    max_content_length: int = _setting(
        4 * 1024 * 1024,
        _integer(1),
        "Largest request body in bytes (4 MiB), also after decompression (413 beyond). nginx's "
        "`client_max_body_size` matches the default: change both together.",
        "Service",
        deploy=True,
    )
    max_image_pixels: int = _setting(
        16_000_000,
        _integer(1),
        "Largest image, width × height, checked from its header before decoding (413 beyond): a "
        "4 MiB PNG can declare gigapixels.",
        "Service",
    )
    max_request_pixels: int = _setting(
        4_000_000,
        _integer(1),
        "Most pixels in one request, all images together, checked from their headers before any "
        "decoding (413 beyond); 1024 MNIST digits fit.",
        "Service",
    )
    trusted_proxies: int = _setting(
        0,
        _integer(0),
        "Proxies in front whose `X-Forwarded-For` and `-Proto` are trusted, so the access log shows "
        "the client's address. `0`: no such header is trusted; behind nginx or an ingress: `1`.",
        "Service",
    )
    # --- Feedback ------------------------------------------------------------------------------
    feedback_dir: str | None = _setting(
        None,
        _optional_text,
        "Where `POST /feedback` keeps corrections. Unset: the route answers 404 `feedback_off`. "
        "[feedback.md](feedback.md)",
        "Feedback",
    )
    feedback_max_bytes: int = _setting(
        1 << 30, _integer(1), "The most the folder's feedback files may hold, 1 GiB (507 beyond).", "Feedback"
    )
    feedback_rotate_bytes: int = _setting(
        64 << 20, _integer(1), "A writer starts a new file past this size, 64 MiB.", "Feedback"
    )
    feedback_image_max_bytes: int = _setting(
        256 << 10,
        _integer(1),
        "The largest image file kept as sent, 256 KiB; a larger one keeps its size and hash only "
        "(the 28×28 input is always kept).",
        "Feedback",
    )
    # --- Logs ----------------------------------------------------------------------------------
    log_format: str = _setting(
        "json",
        _choice(LOG_FORMATS),
        "`json`: one JSON object per line. `text`: plain lines for a terminal.",
        "Logs",
        deploy=True,
    )
    log_level: str = _setting(
        "info",
        _choice(LOG_LEVELS),
        "Least level written, of the app and of gunicorn; access lines are written at any level.",
        "Logs",
        deploy=True,
    )
    access_log: str = _setting(
        "1",
        _choice(ACCESS_LOG_CHOICES),
        "`1`: the app's JSON access line for every request; `errors`: only for answers of 400 and "
        "above (behind nginx, which writes one per request); `0`: none.",
        "Logs",
        deploy=True,
    )
    # --- gunicorn ------------------------------------------------------------------------------
    port: int = _setting(
        8000,
        _integer(1),
        "gunicorn's HTTP port, on 0.0.0.0, in the container or on the host (`make serve`). "
        "Compose publishes nginx on `HOST_PORT` instead.",
        "gunicorn",
    )
    web_concurrency: int = _setting(
        2,
        _integer(1),
        "Worker processes; one per core. Behind nginx: `1` a replica, scaled by replicas "
        "([deploy.md](deploy.md#worker-model-behind-the-proxy)).",
        "gunicorn",
        deploy=True,
    )
    gunicorn_worker_class: str = _setting(
        "gevent",
        _text,
        "gunicorn worker class: `gevent` (greenlets in one thread, service/gevent_worker.py), "
        "`gthread` (a thread pool) or `sync`. Behind nginx: one gevent worker a replica.",
        "gunicorn",
        deploy=True,
    )
    gunicorn_threads: int = _setting(
        4, _integer(1), "Threads per gthread worker. Behind nginx: `1`.", "gunicorn", deploy=True
    )
    gunicorn_worker_connections: int | None = _setting(
        None,
        _optional(_integer(1)),
        "Connections one worker holds at once; for gthread, so that keep-alive clients spread over "
        "the workers.",
        "gunicorn",
        deploy=True,
        shown="gevent: 64; gthread: threads + 1, 1000 for a lone worker",
    )
    gunicorn_timeout: int = _setting(
        30, _integer(0), "Seconds before a silent worker is killed and replaced.", "gunicorn"
    )
    gunicorn_graceful_timeout: int = _setting(
        20, _integer(0), "Seconds in-flight requests get to finish on `TERM` or `HUP`.", "gunicorn"
    )
    gunicorn_keepalive: int = _setting(
        5, _integer(0), "Seconds an idle keep-alive connection stays open.", "gunicorn"
    )
    gunicorn_tmp_dir: str | None = _setting(
        None,
        _optional_text,
        "Worker heartbeat files; a tmpfs, so a read-only root filesystem works.",
        "gunicorn",
        shown="`/dev/shm` if writable",
    )
    gunicorn_access_log: str | None = _setting(
        None,
        _optional_text,
        "gunicorn's own access log (`-`: stdout), on top of the app's JSON access line.",
        "gunicorn",
        shown="off",
    )
    gunicorn_control_socket: str | None = _setting(
        None, _optional_text, "Path of gunicorn's control socket.", "gunicorn", shown="off"
    )
    forwarded_allow_ips: str = _setting(
        "127.0.0.1",
        _text,
        "Addresses gunicorn takes `X-Forwarded-Proto` from (`*`: any). The client's address is "
        "`TRUSTED_PROXIES`' job.",
        "gunicorn",
    )
    prometheus_multiproc_dir: str | None = _setting(
        None,
        _optional_text,
        "Where the workers share their metrics; wiped at start.",
        "gunicorn",
        shown="a fresh temporary folder",
    )
    # --- gRPC ----------------------------------------------------------------------------------
    grpc_port: int = _setting(
        8001,
        _integer(0),
        "The Open Inference Protocol over gRPC: every worker listens on it (SO_REUSEPORT). `0`: off. "
        "Compose publishes nginx's on `HOST_GRPC_PORT` instead.",
        "gRPC",
    )
    grpc_threads: int = _setting(4, _integer(1), "Threads of each worker's gRPC server.", "gRPC")
    grpc_max_concurrent_rpcs: int = _setting(
        64, _integer(1), "gRPC calls one worker holds at once; beyond, `RESOURCE_EXHAUSTED`.", "gRPC"
    )
    grpc_grace_seconds: int = _setting(
        10,
        _integer(0),
        "Seconds in-flight gRPC calls get on `TERM`. Keep it below `GUNICORN_GRACEFUL_TIMEOUT`.",
        "gRPC",
    )
    # --- Trainer -------------------------------------------------------------------------------
    data_dir: str = _setting("data", _text, "MNIST root: `$DATA_DIR/MNIST/raw/*-ubyte`.", "Trainer")
    mnist_download: bool = _setting(
        True, _flag, "`0`: torchvision never downloads a missing MNIST.", "Trainer", deploy=True
    )
    trainer_threads: int = _setting(
        1,
        _integer(1),
        "BLAS threads of `python -m trainer` (unless `OPENBLAS_NUM_THREADS` is set): results depend "
        "on the thread count, so it is pinned.",
        "Trainer",
    )
    tqdm_disable: bool = _setting(
        False, _flag, "`1` hides the progress bars (as `--no-progress` does).", "Trainer"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name.upper(), getattr(self, f.name)))

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Read every setting once from `env` (default os.environ), then apply `overrides`.

        Both are keyed by variable name (`MAX_BATCH`). An empty value, or None in `overrides`,
        means the default: compose passes `${MAX_BATCH:-}` as an empty string. An unknown
        override is refused, so a misspelt name cannot pass unnoticed.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.names():
            if env.get(name, "") != "":
                values[name.lower()] = env[name]
        for name, value in (overrides or {}).items():
            if name not in cls.names():
                raise SettingsError(f"{name}: no such setting (see core/settings.py)")
            if value in (None, ""):
                values.pop(name.lower(), None)
            else:
                values[name.lower()] = value
        return cls(**values)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every variable name, in the class's order."""
        return tuple(f.name.upper() for f in dataclasses.fields(cls))

    def as_env(self) -> dict[str, Any]:
        """Variable name -> typed value (Flask's app.config takes settings by these names)."""
        return {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}


def default_text(f: dataclasses.Field) -> str:
    """A default as it would be written in the environment; empty for unset."""
    value = f.default
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def markdown_table() -> str:
    """The settings table of docs/settings.md, from the class (`make settings-doc` writes it)."""
    lines = ["| Variable | Default | Meaning | Deploy |", "| --- | --- | --- | --- |"]
    fields = dataclasses.fields(Settings)
    for group in GROUPS:
        lines.append(f"| **{group}** | | | |")
        for f in (f for f in fields if f.metadata["group"] == group):
            default = f.metadata["shown"] or (f"`{default_text(f)}`" if default_text(f) else "unset")
            mark = "✓" if f.metadata["deploy"] else ""
            lines.append(f"| `{f.name.upper()}` | {default} | {f.metadata['doc']} | {mark} |")
    return "\n".join(lines) + "\n"


BEGIN = "<!-- settings table: generated from core/settings.py by `make settings-doc` -->\n"
END = "<!-- end of the generated settings table -->\n"


def render_doc(text: str) -> str:
    """`text` (docs/settings.md) with the part between BEGIN and END replaced by the table."""
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError("docs/settings.md lacks the generated table's markers")
    return head + BEGIN + markdown_table() + END + tail


def main(argv: list[str]) -> int:
    """`python -m core.settings [--write docs/settings.md]`: print the table, or rewrite the doc."""
    if argv[:1] == ["--write"] and len(argv) == 2:
        with open(argv[1], encoding="utf-8") as f:
            text = f.read()
        new = render_doc(text)
        if new != text:
            with open(argv[1], "w", encoding="utf-8") as f:
                f.write(new)
            print(f"rewrote the settings table of {argv[1]}")
        return 0
    if argv:
        print("usage: python -m core.settings [--write docs/settings.md]", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A small client for the service, and its command line.

    python -m service.client digit.png [more.png ...] [--url http://localhost:8000] [--version N]

prints one line per image: `digit.png: 7 (confidence 0.981)`. Several files
are sent as one batch request (multipart, field `image`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

DEFAULT_URL = "http://localhost:8000"


class ServiceError(Exception):
    """The service answered with an error (its code and message), or could not be reached."""


class Client:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise ServiceError(f"cannot reach {self.url}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            raise ServiceError(f"HTTP {r.status_code} from {self.url}{path} with a non-JSON body") from None
        if r.status_code >= 400:
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict):
                raise ServiceError(f"HTTP {r.status_code} {err.get('code')}: {err.get('message')}")
            raise ServiceError(f"HTTP {r.status_code}: {body}")
        return body

    def predict(self, image: bytes, version: int | None = None) -> dict[str, Any]:
        """One encoded image (PNG, JPEG, ...) -> {"digit", "confidence", "probabilities", "model"}."""
        params = {"version": version} if version else None
        headers = {"Content-Type": "application/octet-stream"}
        return self._call("POST", "/predict", data=image, headers=headers, params=params)

    def predict_many(self, images: Sequence[bytes], version: int | None = None) -> list[dict[str, Any]]:
        """Several images in one request; predictions in the same order."""
        if len(images) == 1:
            return [self.predict(images[0], version)]
        params = {"version": version} if version else None
        files = [("image", (f"{i}.png", data)) for i, data in enumerate(images)]
        return self._call("POST", "/predict", files=files, params=params)["predictions"]

    def models(self) -> dict[str, Any]:
        return self._call("GET", "/models")

    def ready(self) -> bool:
        try:
            self._call("GET", "/readyz")
        except ServiceError:
            return False
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL})")
    parser.add_argument("--version", type=int, help="model version to use (default: the served one)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    args = parser.parse_args(argv)
    try:
        data = [p.read_bytes() for p in args.images]
    except OSError as e:
        print(f"error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        predictions = Client(args.url, args.timeout).predict_many(data, args.version)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path, p in zip(args.images, predictions, strict=True):
        print(f"{path}: {p['digit']} (confidence {p['confidence']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The peers' bare Flask app (`../shared/peers/flask_app.py`) with the /readyz the stack asks for.

`bench/bare_replicas.yml` serves it in the compose stack's api replicas, under
the project's gunicorn.conf.py, behind the same nginx: what the front door
serves when the replicas do nothing but decode, run the forward pass and
answer `{"digit": d}`. Its figure against the project's replicas, in one run,
is what the project's features cost through the door (docs/benchmarks.md).

The image's HEALTHCHECK and the peers' harness (`--project-url`) both wait for
GET /readyz; the bare app has none, so this module adds it and nothing else.
"""

from __future__ import annotations

from flask_app import app  # the peers' module: on PYTHONPATH from bench/bare_replicas.yml

__all__ = ["app"]


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ready"}

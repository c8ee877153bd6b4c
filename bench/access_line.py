"""What one access line costs: service.logs' AccessFormatter against python-json-logger's
generic formatter, through the logging module as the service writes it.

    python -m bench.access_line [--lines 20000] [--repeats 5]

The access line is the one log line every request pays for, so its cost is
part of every request's; CPU microseconds per line, medians over the repeats,
written to /dev/null.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

from service import logs

FIELDS = {"method": "POST", "path": "/predict", "status": 200, "duration_ms": 1.234, "bytes": 318}


def per_line(logger: logging.Logger, lines: int, extra: dict) -> float:
    t0 = time.process_time()
    for _ in range(lines):
        logger.info("%s %s %s", "POST", "/predict", 200, extra=extra)
    return (time.process_time() - t0) / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    variants = {}
    for name, formatter, extra in (
        ("AccessFormatter (the service's)", logs.AccessFormatter(), {"access": FIELDS}),
        ("python-json-logger's JsonFormatter", logs.JsonFormatter(), FIELDS),
    ):
        logger = logging.getLogger(f"bench.{name}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        handler = logging.StreamHandler(sink)
        handler.setFormatter(formatter)
        handler.addFilter(logs.RequestIdFilter())
        logger.addHandler(handler)
        variants[name] = (logger, extra)
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternating, so noise falls on both
        for name, (logger, extra) in variants.items():
            results[name].append(per_line(logger, args.lines, extra))
    for name, values in results.items():
        print(f"{name:36} {statistics.median(values):6.1f} us per access line (CPU, median)")


if __name__ == "__main__":
    main()

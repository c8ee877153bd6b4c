"""BLAS thread pinning, set before numpy is first imported.

OpenBLAS, OpenMP and MKL read their thread counts once, when numpy loads
them, so the variables must be in the environment before `import numpy`.
This module imports nothing but `os` so that it can run first.
"""

from __future__ import annotations

import os

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_blas_threads(threads: int | str = 1) -> None:
    """Default every BLAS thread count to `threads`; a count already set in the environment wins."""
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, str(threads))

"""`python -m trainer`: see trainer.cli.

BLAS results depend on the number of threads (the order of the sums
changes), so the same seed only gives the same weights with the same thread
count. The trainer therefore pins it, before numpy is imported, to
TRAINER_THREADS (default 1) unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS /
MKL_NUM_THREADS are set explicitly. One thread is also the faster choice when
few cores are shared by several processes, where two BLAS threads wait on each other.
"""

import os
import sys

from core.threads import pin_blas_threads

pin_blas_threads(os.environ.get("TRAINER_THREADS", "1"))

from trainer.cli import main  # noqa: E402 - must come after the thread settings

sys.exit(main())

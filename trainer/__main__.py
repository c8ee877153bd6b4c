"""`python -m trainer`: see trainer.cli.

BLAS results depend on the number of threads (the order of the sums
changes), so the same seed only gives the same weights with the same thread
count. The trainer therefore pins it, before numpy is imported, to
TRAINER_THREADS (default 1) unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS /
MKL_NUM_THREADS are set explicitly. One thread is also the faster choice when
few cores are shared by several processes, where two BLAS threads wait on each other.
"""

import sys

from core.settings import Settings, SettingsError  # the standard library only: numpy is not loaded yet
from core.threads import pin_blas_threads

try:
    pin_blas_threads(Settings.from_env().trainer_threads)
except SettingsError as e:
    sys.exit(f"error: {e}")

from trainer.cli import main  # after the thread settings: it imports numpy

sys.exit(main())

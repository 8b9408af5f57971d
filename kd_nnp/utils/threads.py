"""Deliberate thread control.

On small CPU machines scipy/numpy BLAS threads fight torch's intra-op threads (this doubled
relaxation time on a 2-core machine), and one thread per worker *process* beats several
threads in one process. Every kd_nnp entry point calls :func:`set_threads` once.
"""

from __future__ import annotations

import os

_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def set_threads(n: int | None = None) -> int:
    """Set torch, OpenMP and BLAS threads of this process to ``n``.

    ``n=None`` reads ``$KD_NNP_THREADS`` (default 1). Environment variables are set for
    child processes; ``threadpoolctl`` limits BLAS pools already loaded in this one.
    Returns the number of threads set.
    """
    if n is None:
        n = int(os.environ.get("KD_NNP_THREADS", "1"))
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    for var in _ENV_VARS:
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        pass
    return n

"""Shards ``K/N``: the one convention of the jobs that split work over a cluster array.

``K`` counts from 0 to ``N-1``, as SLURM numbers the tasks of ``#SBATCH --array=0-(N-1)``, so
``--shard $SLURM_ARRAY_TASK_ID/N`` (``kd-nnp data generate``) and
``shard=$SLURM_ARRAY_TASK_ID/N`` (``kd-nnp label``) need no arithmetic.

:func:`shard_of` puts a key (a frame id) in a shard by a stable hash of the key alone, not by
its position in a store: frames appended later never move existing frames to another shard, and
every process computes the same slice without reading anything else.
"""

from __future__ import annotations

import hashlib

from kd_nnp.errors import SettingsError


def check_shard(k: int, n: int) -> tuple[int, int]:
    """``(k, n)`` as ints when ``0 <= k < n`` (``n >= 1``); otherwise :class:`SettingsError`."""
    try:
        ki, ni = int(k), int(n)
    except (TypeError, ValueError):
        raise SettingsError(f"shard must be K/N with integers K and N, got {k}/{n}") from None
    if not (ni >= 1 and 0 <= ki < ni):
        raise SettingsError(f"shard must be K/N with 0 <= K < N, got {ki}/{ni}")
    return ki, ni


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` (K = 0..N-1); a bad spec raises :class:`SettingsError`."""
    parts = str(text).strip().split("/")
    try:
        k, n = (int(x) for x in parts)
    except ValueError:
        raise SettingsError(
            f"shard must be K/N (e.g. 0/8; K = 0..N-1), got {str(text)!r}"
        ) from None
    return check_shard(k, n)


def shard_of(key: str, n: int) -> int:
    """The shard (0..n-1) of ``key``: the first 8 bytes of its SHA-256, modulo ``n``
    (stable across processes, machines, Python versions and store order)."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % int(n)

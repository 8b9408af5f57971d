"""Validation split grouped by material/trajectory and nested, seeded training subsets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_frames(
    frame_ids: Sequence[str],
    group_ids: Sequence[str],
    *,
    val_fraction: float = 0.1,
    n_val: int | None = None,
    seed: int = 0,
    grouped: bool = True,
) -> tuple[list[str], list[str]]:
    """Return (train_pool, val) frame ids. Grouped: whole groups go to validation.

    The train pool is returned in a seeded random order; taking its first ``n`` items gives
    nested training subsets for the same seed. The result depends only on the ids and the
    seed, not on the order the frames were written to the store (parallel writers).
    """
    rng = np.random.default_rng(seed)
    by_id = sorted(zip(map(str, frame_ids), map(str, group_ids)))
    frame_ids = [f for f, _ in by_id]
    group_ids = [g for _, g in by_id]
    target = n_val if n_val is not None else int(round(val_fraction * len(frame_ids)))
    if target < 0 or target >= len(frame_ids):
        raise ValueError(f"validation size {target} impossible for {len(frame_ids)} frames")
    val: set[str] = set()
    if target > 0:
        if grouped:
            groups: dict[str, list[str]] = {}
            for fid, gid in zip(frame_ids, group_ids):
                groups.setdefault(str(gid), []).append(fid)
            if len(groups) < 2:
                raise ValueError(
                    "grouped split needs at least 2 groups (materials/trajectories); "
                    "set data.grouped=false to split frames of one group"
                )
            order = sorted(groups)
            rng.shuffle(order)
            for gid in order:
                if len(val) >= target:
                    break
                if len(val) + len(groups[gid]) >= len(frame_ids):
                    continue  # never put everything in validation
                val.update(groups[gid])
        else:
            val.update(rng.choice(frame_ids, size=target, replace=False).tolist())
    pool = [f for f in frame_ids if f not in val]
    perm = np.random.default_rng(seed + 7919).permutation(len(pool))
    return [pool[i] for i in perm], [f for f in frame_ids if f in val]

"""Glue between the data module and the exact feature cache (:mod:`kd_nnp.training.features`).

``attach_feature_cache`` gives the data module a loader that returns each frame's cached
features (building them once, on disk, content-addressed), so training steps never run the
frozen backbone. Frames whose Jacobian would exceed ``module.max_feature_bytes`` get no
features under ``backend=auto`` and their batches take CHGNet's full forward instead (the
two paths are exact and interchangeable, see tests/test_features.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kd_nnp.utils.paths import cache_dir

log = logging.getLogger(__name__)


def attach_feature_cache(datamodule: Any, module: Any, *, prebuild: bool = True) -> dict:
    """Install the feature loader on ``datamodule``; optionally build all features now."""
    from tqdm.auto import tqdm

    from kd_nnp.training.data import GraphCache
    from kd_nnp.training.features import FeatureCache, jacobian_nbytes

    cache = FeatureCache(cache_dir() / "features", module.student)
    forces, stress = module.compute_forces, module.compute_stress

    def fits(n_atoms: int) -> bool:
        need = jacobian_nbytes(n_atoms, stress) if forces else 0
        return module.backend == "cached" or need <= module.max_feature_bytes

    entries: dict[str, Any] = {}  # graph key -> cache entry folder (hash the graph once)
    in_memory: dict[str, Any] = {}  # graph key -> features (energy-only: a few KB per frame)

    def loader(sample: Any, graph: Any) -> Any:
        """Features of ``sample``; ``graph`` may be None (loaded from disk the first time)."""
        if not fits(sample.n_atoms):
            return None
        key = sample.graph_key
        if key in in_memory:
            return in_memory[key]
        if key in entries:
            return cache.load_entry(entries[key], forces=forces, stress=stress)
        if graph is None:
            graph = GraphCache.load(sample.graph_path)
        entries[key] = cache.path(graph)
        feats = cache.get(graph, forces=forces, stress=stress, entry=entries[key])
        if not (forces or stress):  # no Jacobian: keep the small arrays in RAM
            feats.h = feats.h.clone()
            in_memory[key] = feats
        return feats

    datamodule.feature_loader = loader
    stats = {"frames": 0, "cached": 0, "full_path": 0, "build_s": 0.0}
    if prebuild:
        t0 = time.perf_counter()
        samples = datamodule.train_samples + datamodule.val_samples
        for s in tqdm(samples, desc="feature cache", smoothing=0.1):
            stats["frames"] += 1
            if fits(s.n_atoms):
                cache.get(GraphCache.load(s.graph_path), forces=forces, stress=stress)
                stats["cached"] += 1
            else:
                stats["full_path"] += 1
        stats["build_s"] = time.perf_counter() - t0
        log.info("feature cache: %s", stats)
    datamodule.summary["feature_cache"] = stats
    return stats

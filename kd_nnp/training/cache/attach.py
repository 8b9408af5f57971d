"""Glue between the data module and the exact feature cache (:mod:`.features`).

``attach_feature_cache`` gives the data module a loader that returns each frame's cached
features (building them once, on disk, content-addressed), so training steps never run the
frozen backbone. Frames whose Jacobian would exceed ``module.max_feature_bytes`` get no
features under ``backend=auto`` and their batches take the lean path instead
(:mod:`kd_nnp.training.lean`; the paths are exact and interchangeable, see
tests/test_features.py and tests/test_lean.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kd_nnp.training.progress import ProgressLog
from kd_nnp.utils.paths import cache_dir

log = logging.getLogger(__name__)


# cached features of a frame up to RAM_FRAME_BYTES are kept in memory, RAM_TOTAL_BYTES in all
RAM_FRAME_BYTES = 2 * 2**20
RAM_TOTAL_BYTES = 2 * 2**30
_WORKER_CACHE: Any = None


def _init_build_worker(model_name: str, path: str | None, root: str, backbone_key: str) -> None:
    global _WORKER_CACHE
    from pathlib import Path

    from kd_nnp.teachers.calculators import load_chgnet
    from kd_nnp.training.cache.features import FeatureCache
    from kd_nnp.utils.memory import keep_freed_memory

    keep_freed_memory()  # fewer page faults in the Jacobian builds (kd_nnp/utils/memory.py)
    cache = FeatureCache(Path(root), load_chgnet(model_name, path))
    if cache.backbone_key != backbone_key:  # never write entries under another backbone's key
        raise RuntimeError("feature-build worker loaded another backbone than the student's")
    _WORKER_CACHE = cache


def _build_task(item: dict[str, Any]) -> int:
    from kd_nnp.training.cache.graphs import GraphCache

    _WORKER_CACHE.get(
        GraphCache.load(item["graph_path"]), forces=item["forces"], stress=item["stress"],
        entry=item["entry"], force_atoms=item["force_atoms"],
        strain_offsets=item["strain_offsets"],
    )  # fmt: skip
    return _WORKER_CACHE.n_builds


def attach_feature_cache(
    datamodule: Any,
    module: Any,
    *,
    prebuild: bool = True,
    workers: int = 1,
    device: str = "cpu",
) -> dict:
    """Install the feature loader on ``datamodule``; optionally build all features now.

    ``workers > 1`` builds the missing entries in that many processes (one thread each);
    entries are written atomically, so a killed build keeps every finished frame.
    ``device``: where the Jacobians are built: ``cpu``, ``cuda`` (one process on the GPU;
    ``workers`` is then ignored) or ``auto`` (``cuda`` when available). Entries are stored
    on disk and loaded on the CPU either way; training moves what a step needs.
    """
    import torch

    from kd_nnp.training.cache.features import FeatureCache
    from kd_nnp.training.cache.graphs import GraphCache
    from kd_nnp.training.jacobian import jacobian_nbytes

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"feature_device must be cpu, cuda or auto, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"feature_device={device} but torch sees no CUDA device")
    cache = FeatureCache(cache_dir() / "features", module.student, device=device)
    forces, stress = module.compute_forces, module.compute_stress
    force_atoms = getattr(datamodule, "force_atoms", None)

    def fits(n_atoms: int) -> bool:
        need = jacobian_nbytes(n_atoms, stress, force_atoms=force_atoms) if forces else 0
        return module.backend == "cached" or need <= module.max_feature_bytes

    entries: dict[str, Any] = {}  # graph key -> cache entry folder (hash the graph once)
    ready: set[str] = set()  # graph keys whose entry holds everything this run loads
    in_memory: dict[str, Any] = {}  # graph key -> features held in RAM (small frames)
    held = [0]  # bytes held in RAM

    def build_args(sample: Any) -> dict[str, Any]:
        """The sample's force subset and molecule offsets, as far as this run needs them."""
        return {
            "force_atoms": sample.force_index if forces else None,
            "strain_offsets": sample.mol_offsets if stress else None,
        }

    def entry_of(sample: Any, graph: Any = None) -> Any:
        """The sample's cache entry folder (its graph loaded and hashed the first time only)."""
        key = sample.graph_key
        if key not in entries:
            entries[key] = cache.path(
                graph if graph is not None else GraphCache.load(sample.graph_path)
            )
        return entries[key]

    def loader(sample: Any, graph: Any) -> Any:
        """Features of ``sample``; ``graph`` may be None (loaded from disk the first time)."""
        if not fits(sample.n_atoms):
            return None
        key = sample.graph_key
        if key in in_memory:
            return in_memory[key]
        args = build_args(sample)
        if key in ready:  # built and complete: no graph, no file checks
            feats = cache.load_entry(entries[key], forces=forces, stress=stress,
                                     force_atoms=args["force_atoms"],
                                     molecular=args["strain_offsets"] is not None)  # fmt: skip
        else:
            if graph is None:
                graph = GraphCache.load(sample.graph_path)
            feats = cache.get(graph, forces=forces, stress=stress, entry=entry_of(sample, graph),
                              **args)  # fmt: skip
            ready.add(key)
        # small entries (energy only: a few KB; M force atoms + strain: ~0.3 MB at 64 atoms)
        # stay in RAM, so epochs do not reopen memory maps; full Jacobians stay mapped
        nbytes = jacobian_nbytes(sample.n_atoms, stress, forces=forces, force_atoms=force_atoms)
        if nbytes <= RAM_FRAME_BYTES and held[0] + nbytes <= RAM_TOTAL_BYTES:
            for name in ("h", "jac_pos", "jac_strain"):
                if getattr(feats, name) is not None:
                    setattr(feats, name, getattr(feats, name).clone())
            in_memory[key] = feats
            held[0] += nbytes
        return feats

    datamodule.feature_loader = loader
    stats: dict[str, Any] = {"frames": 0, "cached": 0, "full_path": 0, "built": 0,
                             "build_s": 0.0, "force_atoms": force_atoms, "stress": stress,
                             "stress_mode": getattr(datamodule, "stress_mode", "affine"),
                             "device": str(device)}  # fmt: skip
    if prebuild:
        t0 = time.perf_counter()
        # the replay frames (data.replay_store) train too: their features are built here
        samples = [
            *datamodule.train_samples, *datamodule.val_samples,
            *getattr(datamodule, "replay_samples", []),
        ]  # fmt: skip
        todo = []
        for s in samples:
            stats["frames"] += 1
            if fits(s.n_atoms):
                stats["cached"] += 1
                todo.append(s)
            else:
                stats["full_path"] += 1
        if int(workers) > 1 and (forces or stress) and device == "cpu":
            from kd_nnp.utils.parallel import run_tasks

            missing = []
            for s in todo:
                args = build_args(s)
                if cache.complete(entry_of(s), forces=forces, stress=stress,
                                  force_atoms=args["force_atoms"],
                                  molecular=args["strain_offsets"] is not None):  # fmt: skip
                    ready.add(s.graph_key)
                else:
                    missing.append(s)
            cfg = module.student_cfg
            items = [
                (
                    s.frame_id,
                    {
                        "graph_path": s.graph_path,
                        "entry": entry_of(s),
                        "forces": forces,
                        "stress": stress,
                        **build_args(s),
                    },
                )  # fmt: skip
                for s in missing
            ]
            errors = []
            progress = ProgressLog(log, "feature cache (building)", len(items))
            for res in run_tasks(
                _build_task, items, n_workers=min(int(workers), max(1, len(items))),
                initializer=_init_build_worker,
                initargs=(cfg["model_name"], cfg.get("path"), str(cache.root), cache.backbone_key),
                desc="feature cache",
            ):  # fmt: skip
                progress.step()
                if not res.ok:
                    errors.append(f"{res.key}: {res.error.splitlines()[0]}")
            if errors:
                raise RuntimeError(
                    f"building cached features failed for {len(errors)} frame(s) (finished "
                    f"frames are kept; rerun to resume): {errors[:3]}"
                )
            stats["built"] = len(missing)
            ready.update(s.graph_key for s in missing)
        else:
            if forces or stress:
                from kd_nnp.utils.memory import keep_freed_memory

                keep_freed_memory()
            n0 = cache.n_builds
            progress = ProgressLog(log, "feature cache", len(todo))
            for s in todo:
                graph = GraphCache.load(s.graph_path)
                cache.get(graph, forces=forces, stress=stress, entry=entry_of(s, graph),
                          **build_args(s))  # fmt: skip
                ready.add(s.graph_key)
                progress.step()
            stats["built"] = cache.n_builds - n0
        stats["build_s"] = time.perf_counter() - t0
        log.info("feature cache: %s", stats)
    datamodule.summary["feature_cache"] = stats
    return stats

"""CHGNet graphs of the frames, converted once and cached on disk by content hash."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms

from kd_nnp.errors import KdNnpError
from kd_nnp.utils.paths import cache_dir

GRAPH_CACHE_VERSION = 1


def atoms_content_hash(atoms: Atoms) -> str:
    h = hashlib.sha256()
    h.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(atoms.positions, dtype=np.float64), 8).tobytes())
    h.update(np.round(np.asarray(atoms.cell.array, dtype=np.float64), 8).tobytes())
    return h.hexdigest()[:24]


class GraphCache:
    """CHGNet ``CrystalGraph`` per structure on disk: ``root/<key[:2]>/<key>.pt``.

    The key hashes the structure (numbers, positions, cell) and the converter settings, so
    identical frames in different stores and sweep jobs share one file. Writes are atomic
    (temporary file + rename), so parallel jobs never read half a graph.
    """

    def __init__(self, root: str | Path | None = None, converter: Any = None) -> None:
        from chgnet.graph import CrystalGraphConverter

        self.root = Path(root) if root is not None else cache_dir() / "graphs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.converter = converter or CrystalGraphConverter(
            atom_graph_cutoff=6, bond_graph_cutoff=3, algorithm="fast"
        )
        c = self.converter
        self._settings = f"v{GRAPH_CACHE_VERSION}|{c.atom_graph_cutoff}|{c.bond_graph_cutoff}"
        self.n_built = 0

    def key(self, atoms: Atoms) -> str:
        return hashlib.sha256((atoms_content_hash(atoms) + self._settings).encode()).hexdigest()[
            :32
        ]

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, atoms: Atoms, graph_id: str = "") -> tuple[str, Path]:
        """Build the graph if missing; return (key, path)."""
        key = self.key(atoms)
        path = self.path(key)
        if not path.exists():
            from pymatgen.io.ase import AseAtomsAdaptor

            structure = AseAtomsAdaptor.get_structure(atoms)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    graph = self.converter(structure, graph_id=graph_id)
                except ValueError as err:  # e.g. an atom with no neighbour within the cutoff
                    raise KdNnpError(
                        f"frame {graph_id!r} ({structure.composition.formula}, {len(atoms)} "
                        f"atoms): CHGNet cannot build its graph: {err}"
                    ) from err
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(graph.to_dict(), tmp)
            os.replace(tmp, path)
            self.n_built += 1
        return key, path

    @staticmethod
    def load(path: Path) -> Any:
        from chgnet.graph import CrystalGraph

        return CrystalGraph.from_dict(torch.load(path, weights_only=False))


_WORKER_GRAPHS: GraphCache | None = None


def _init_graph_worker(root: str) -> None:
    global _WORKER_GRAPHS
    _WORKER_GRAPHS = GraphCache(root)


def _graph_task(item: tuple[str, Atoms]) -> str:
    assert _WORKER_GRAPHS is not None
    return _WORKER_GRAPHS.get(item[1], graph_id=item[0])[0]


def prebuild_graphs(
    cache: GraphCache, frames: list[tuple[str, Atoms]], workers: int, progress: Any = None
) -> int:
    """Build the missing graphs of ``frames`` (``(frame id, atoms)``) with ``workers``
    processes (one thread each) into ``cache``; returns how many were built. Frames whose
    graph fails are left missing: the caller's :meth:`GraphCache.get` raises for them with
    the frame named. ``progress`` (a ``ProgressLog``) is stepped once per frame, cached ones
    included. With ``workers <= 1`` nothing is done here (the caller builds serially)."""
    from kd_nnp.utils.parallel import run_tasks

    if workers <= 1:
        return 0
    missing = [(fid, atoms) for fid, atoms in frames if not cache.path(cache.key(atoms)).exists()]
    if progress is not None and len(frames) > len(missing):
        progress.step(len(frames) - len(missing))
    built = 0
    for res in run_tasks(
        _graph_task, [(fid, (fid, atoms)) for fid, atoms in missing], n_workers=workers,
        initializer=_init_graph_worker, initargs=(str(cache.root),), progress=False,
    ):  # fmt: skip
        built += res.ok
        if progress is not None:
            progress.step()
    cache.n_built += built
    return built

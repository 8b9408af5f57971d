"""On-disk, content-addressed cache of :class:`~kd_nnp.training.jacobian.FrameFeatures`."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor

from kd_nnp.training.backbone import FEATURE_DIM, check_model
from kd_nnp.training.jacobian import DEFAULT_CHUNK_SIZE, FrameFeatures, compute_features

CACHE_FORMAT_VERSION = 1
# parameters that do not influence the cached features (the trainable readout)
READOUT_PREFIXES = ("mlp.", "readout_norm.")


def _hash_tensor(hasher: hashlib._Hash, name: str, t: Tensor) -> None:
    arr = t.detach().cpu().contiguous().numpy()
    hasher.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
    hasher.update(arr.tobytes())


def graph_hash(graph: CrystalGraph) -> str:
    """sha256 of what the features depend on: species, coordinates, lattice, neighbour lists."""
    hasher = hashlib.sha256()
    for name in (
        "atomic_number",
        "atom_frac_coord",
        "lattice",
        "atom_graph",
        "neighbor_image",
        "directed2undirected",
        "undirected2directed",
        "bond_graph",
    ):
        _hash_tensor(hasher, name, getattr(graph, name))
    hasher.update(f"cutoffs|{graph.atom_graph_cutoff!r}|{graph.bond_graph_cutoff!r}".encode())
    return hasher.hexdigest()


def backbone_hash(model: CHGNet) -> str:
    """sha256 of the frozen backbone: every state entry but ``mlp.*``/``readout_norm.*``,
    plus the architecture arguments."""
    hasher = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not name.startswith(READOUT_PREFIXES):
            _hash_tensor(hasher, name, t)
    args = {k: v for k, v in model.model_args.items() if k != "version"}
    hasher.update(json.dumps(args, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def _load_mmap(path: Path) -> Tensor:
    # copy-on-write map: pages are read lazily from disk and never written back; unlike
    # mmap_mode="r" the array is writable, so torch.from_numpy does not warn
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _force_tag(index: Tensor | np.ndarray | Sequence[int] | None) -> str:
    """File-name tag of a force-atom subset: '' for all atoms, else 'm<M>-<sha of indices>'."""
    if index is None:
        return ""
    arr = np.asarray(index, dtype=np.int64)
    return f"m{len(arr)}-" + hashlib.sha256(arr.tobytes()).hexdigest()[:16]


class FeatureCache:
    """On-disk, content-addressed cache of :class:`FrameFeatures`.

    Key = sha256(graph content) + sha256(frozen backbone state + architecture) + cache format
    version. Layout: ``root/v<version>/<key[:2]>/<key>/{h,jac_pos,jac_strain}.npy`` and
    ``meta.json``; a force-atom subset has its own ``jac_pos.<tag>.npy`` +
    ``force_index.<tag>.npy`` (``tag`` = M and a hash of the indices, so other subsets never
    read it). Each file is written to a temporary name and renamed, so a killed build
    leaves no partial entry. Loaded arrays are memory-mapped. The backbone hash is taken
    at construction: build a new cache object after changing the backbone.
    """

    def __init__(
        self,
        root: Path,
        model: CHGNet,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        device: str | torch.device | None = None,
    ) -> None:
        check_model(model)
        self.root = Path(root)
        self.backbone_key = backbone_hash(model)
        # builds run on ``device`` (e.g. "cuda"); entries are stored and loaded on the CPU
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        if next(model.parameters()).device != self.device:
            import copy

            model = copy.deepcopy(model).to(self.device)
        self.model = model
        self.chunk_size = chunk_size
        self.n_builds = 0  # number of frames (re)built by this object, for tests/logging

    def key(self, graph: CrystalGraph) -> str:
        hasher = hashlib.sha256()
        hasher.update(f"kd_nnp-features-v{CACHE_FORMAT_VERSION}|".encode())
        hasher.update(graph_hash(graph).encode())
        hasher.update(self.backbone_key.encode())
        return hasher.hexdigest()

    def path(self, graph: CrystalGraph) -> Path:
        key = self.key(graph)
        return self.root / f"v{CACHE_FORMAT_VERSION}" / key[:2] / key

    @staticmethod
    def pos_files(entry: Path, index: Tensor | np.ndarray | None) -> tuple[Path, Path | None]:
        tag = _force_tag(index)
        if not tag:
            return entry / "jac_pos.npy", None
        return entry / f"jac_pos.{tag}.npy", entry / f"force_index.{tag}.npy"

    def complete(self, entry: Path, *, forces: bool, stress: bool,
                 force_atoms: Tensor | np.ndarray | None = None,
                 molecular: bool = False) -> bool:  # fmt: skip
        """Whether ``entry`` holds every array a :meth:`get` with these arguments loads."""
        pos_file, _ = self.pos_files(entry, force_atoms)
        return (
            (entry / "meta.json").is_file()
            and (not forces or pos_file.is_file())
            and (not stress or self.strain_file(entry, molecular).is_file())
        )

    def get(
        self,
        graph: CrystalGraph,
        *,
        forces: bool,
        stress: bool,
        entry: Path | None = None,
        force_atoms: Tensor | np.ndarray | Sequence[int] | None = None,
        strain_offsets: np.ndarray | None = None,
    ) -> FrameFeatures:
        """Load the frame's features, building and storing what is missing first.

        ``entry``: ``path(graph)`` when the caller already has it (hashing a graph is not free).
        ``force_atoms``: sorted atom indices of a force subset (:func:`select_force_atoms`);
        None = all atoms. ``strain_offsets``: molecule-rigid strain Jacobian (stored apart
        from the affine one; the offsets follow from the frame's content).
        """
        entry = self.path(graph) if entry is None else entry
        index = None if force_atoms is None else np.asarray(force_atoms, dtype=np.int64)
        pos_file, index_file = self.pos_files(entry, index)
        strain_file = self.strain_file(entry, strain_offsets is not None)
        meta_path = entry / "meta.json"
        need_pos = forces and not pos_file.is_file()
        need_strain = stress and not strain_file.is_file()
        if need_pos or need_strain or not meta_path.is_file():
            entry.mkdir(parents=True, exist_ok=True)
            feats = compute_features(
                self.model, graph.to(self.device), forces=need_pos, stress=need_strain,
                chunk_size=self.chunk_size, force_atoms=index if need_pos else None,
                strain_offsets=strain_offsets if need_strain else None,
            )  # fmt: skip
            self.n_builds += 1
            if feats.jac_pos is not None:
                if index_file is not None:  # the index first: a jac_pos file implies its index
                    _save_atomic(index_file, index)
                _save_atomic(pos_file, feats.jac_pos.numpy())
            if feats.jac_strain is not None:
                _save_atomic(strain_file, feats.jac_strain.numpy())
            if not meta_path.is_file():
                _save_atomic(entry / "h.npy", feats.h.numpy())
                meta = {
                    "format": CACHE_FORMAT_VERSION,
                    "atomref_energy": feats.atomref_energy,
                    "volume": feats.volume,
                    "n_atoms": feats.n_atoms,
                    "graph_id": graph.graph_id,
                    "composition": graph.composition,
                }
                fd, tmp = tempfile.mkstemp(dir=entry, prefix=".meta.", suffix=".tmp")
                with os.fdopen(fd, "w") as fh:
                    json.dump(meta, fh)
                os.replace(tmp, meta_path)
        return self.load_entry(entry, forces=forces, stress=stress, force_atoms=index,
                               molecular=strain_offsets is not None)  # fmt: skip

    @staticmethod
    def strain_file(entry: Path, molecular: bool) -> Path:
        """``jac_strain.npy`` (affine, chgnet's stress) or ``jac_strain.molecular.npy``."""
        return entry / ("jac_strain.molecular.npy" if molecular else "jac_strain.npy")

    @classmethod
    def load_entry(
        cls,
        entry: Path,
        *,
        forces: bool,
        stress: bool,
        force_atoms: Tensor | np.ndarray | Sequence[int] | None = None,
        molecular: bool = False,
    ) -> FrameFeatures:
        """Load an entry already known to exist (``path(graph)`` of an earlier ``get``)."""
        index = None if force_atoms is None else np.asarray(force_atoms, dtype=np.int64)
        pos_file, index_file = cls.pos_files(entry, index)
        try:
            meta = json.loads((entry / "meta.json").read_text())
            h = _load_mmap(entry / "h.npy")
            jac_pos = _load_mmap(pos_file) if forces else None
            jac_strain = _load_mmap(cls.strain_file(entry, molecular)) if stress else None
            stored_index = np.load(index_file) if (forces and index_file is not None) else None
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"corrupt feature-cache entry {entry}: {exc}; delete the folder to rebuild it"
            ) from exc
        if stored_index is not None and not np.array_equal(stored_index, index):
            raise RuntimeError(
                f"corrupt feature-cache entry {entry}: {index_file.name} holds other force "
                "atoms than its name says; delete the folder to rebuild it"
            )
        n = int(meta["n_atoms"])
        m = n if index is None else len(index)
        expected = {"h": (n, FEATURE_DIM), "jac_pos": (n, FEATURE_DIM, m, 3),
                    "jac_strain": (n, FEATURE_DIM, 3, 3)}  # fmt: skip
        for name, arr in (("h", h), ("jac_pos", jac_pos), ("jac_strain", jac_strain)):
            if arr is not None and tuple(arr.shape) != expected[name]:
                raise RuntimeError(
                    f"corrupt feature-cache entry {entry}: {name} has shape "
                    f"{tuple(arr.shape)}, expected {expected[name]}"
                )
        return FrameFeatures(
            h=h,
            jac_pos=jac_pos,
            jac_strain=jac_strain,
            atomref_energy=float(meta["atomref_energy"]),
            volume=float(meta["volume"]),
            n_atoms=n,
            force_index=torch.from_numpy(index) if (forces and index is not None) else None,
        )

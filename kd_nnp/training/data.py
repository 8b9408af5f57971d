"""``FramesDataModule``: labelled frames from a store -> cached CHGNet graphs -> batches.

- reads frames (hard labels) and one teacher label set (soft labels) from a
  :class:`~kd_nnp.data.store.FrameStore`;
- splits off a validation set (grouped by ``group_id`` so no material/trajectory is in both),
  then draws ``n_train`` training frames from a seeded permutation of the rest, so that for a
  given seed the Ntrain=100 set is inside the Ntrain=500 set (nested subsets share caches);
- aligns soft energies with a per-element reference fitted on the training frames only
  (:mod:`kd_nnp.teachers.reference`), recorded in ``reference`` and in the run folder; hard
  energies likewise when ``hard_reference="student"`` (DFT labels on another absolute scale
  than the student's, e.g. vdW-DF2; the default ``none`` leaves them untouched);
- converts structures to CHGNet graphs once, cached on disk by content hash
  (:class:`GraphCache`), so epochs, Ntrain subsets and sweep jobs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from ase import Atoms
from torch.utils.data import DataLoader, Dataset

from kd_nnp.data.store import Frame, FrameStore, Labels
from kd_nnp.teachers.reference import ElementReference, fit_element_reference
from kd_nnp.training.features import molecular_stress, molecule_offsets, select_force_atoms
from kd_nnp.utils.paths import cache_dir

log = logging.getLogger(__name__)

EV_A3_TO_GPA = 160.21766208
HARD_REFERENCE_METHODS = ("none", "student")
GRAPH_CACHE_VERSION = 1


# --------------------------------------------------------------------------- graph cache
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
                graph = self.converter(structure, graph_id=graph_id)
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


# --------------------------------------------------------------------------- splits
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


# --------------------------------------------------------------------------- samples
@dataclass
class Sample:
    frame_id: str
    graph_key: str
    graph_path: Path
    numbers: np.ndarray
    hard: Labels | None
    soft: Labels | None
    soft_energy_aligned: float | None = None
    # hard energy after the hard reference alignment (None: the raw hard energy is used)
    hard_energy_aligned: float | None = None
    hard_energy_masked: bool = False  # composition outside the hard reference's span
    features: Any = None  # FrameFeatures when the feature cache is on
    info: dict[str, Any] = field(default_factory=dict)
    # atoms whose forces enter losses and metrics (data.force_atoms); None = all atoms
    force_index: np.ndarray | None = None
    # data.stress_mode=molecular: offsets of the atoms from their molecule centres, volume
    mol_offsets: np.ndarray | None = None
    volume: float | None = None

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)


class FramesDataset(Dataset):
    def __init__(self, samples: list[Sample], feature_loader: Any = None) -> None:
        self.samples = samples
        self.feature_loader = feature_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        s = self.samples[idx]
        # with cached features the graph is not needed (collate loads it if a batch mixes)
        feats = self.feature_loader(s, None) if self.feature_loader is not None else None
        graph = GraphCache.load(s.graph_path) if feats is None else None
        return {"sample": s, "graph": graph, "features": feats}


def _labels_tensors(
    samples: Sequence[Sample], target: str, n_atoms: Sequence[int]
) -> dict[str, torch.Tensor]:
    b, total = len(samples), int(sum(n_atoms))
    e = torch.zeros(b)
    em = torch.zeros(b, dtype=torch.bool)
    f = torch.zeros(total, 3)
    fm = torch.zeros(total, dtype=torch.bool)
    s = torch.zeros(b, 6)
    sm = torch.zeros(b, dtype=torch.bool)
    offset = 0
    for i, (smp, n) in enumerate(zip(samples, n_atoms)):
        lab = smp.hard if target == "hard" else smp.soft
        if lab is not None:
            if target == "soft":
                energy = smp.soft_energy_aligned
            elif smp.hard_energy_masked:
                energy = None
            elif smp.hard_energy_aligned is not None:
                energy = smp.hard_energy_aligned
            else:
                energy = lab.energy
            if energy is not None:
                e[i] = energy / n
                em[i] = True
            if lab.forces is not None:
                f[offset : offset + n] = torch.tensor(np.asarray(lab.forces), dtype=torch.float32)
                if smp.force_index is None:
                    fm[offset : offset + n] = True
                else:  # subsampled force atoms: only their components count
                    fm[offset + torch.as_tensor(smp.force_index, dtype=torch.long)] = True
            if lab.stress is not None and smp.mol_offsets is None:
                s[i] = torch.as_tensor(lab.stress * EV_A3_TO_GPA, dtype=torch.float32)
                sm[i] = True
            elif lab.stress is not None and lab.forces is not None:  # molecule-rigid stress
                mol = molecular_stress(lab.stress, lab.forces, smp.mol_offsets, smp.volume)
                s[i] = torch.as_tensor(mol * EV_A3_TO_GPA, dtype=torch.float32)
                sm[i] = True
        offset += n
    return {
        f"{target}_energy": e,
        f"{target}_energy_mask": em,
        f"{target}_forces": f,
        f"{target}_forces_mask": fm,
        f"{target}_stress": s,
        f"{target}_stress_mask": sm,
    }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [it["sample"] for it in items]
    n_atoms = [s.n_atoms for s in samples]
    cached = all(it["features"] is not None for it in items)
    batch: dict[str, Any] = {
        "frame_ids": [s.frame_id for s in samples],
        # the full path needs every graph of the batch; the cached path needs none
        "graphs": None
        if cached
        else [it["graph"] or GraphCache.load(it["sample"].graph_path) for it in items],
        "features": [it["features"] for it in items] if cached else None,
        "n_atoms": torch.as_tensor(n_atoms, dtype=torch.long),
    }
    if any(s.mol_offsets is not None for s in samples):  # the full backend's molecular stress
        batch["mol_offsets"] = torch.as_tensor(
            np.concatenate([s.mol_offsets for s in samples]), dtype=torch.float32
        )
        batch["volumes"] = torch.as_tensor([s.volume for s in samples], dtype=torch.float32)
    batch.update(_labels_tensors(samples, "hard", n_atoms))
    batch.update(_labels_tensors(samples, "soft", n_atoms))
    return batch


# --------------------------------------------------------------------------- datamodule
class FramesDataModule(L.LightningDataModule):
    """Labelled frames for distillation.

    Args:
        store: path of a frames store (``kd-nnp data ...``).
        label_set: name of the teacher label set (``STORE/labels/<name>.db``); None for
            hard-only training.
        n_train: number of training frames (None: all of the training pool).
        val_fraction / n_val: size of the validation split.
        seed: draws the split and the training subset.
        grouped: split by ``group_id`` (no group in both train and validation).
        reference: soft-energy alignment, ``student`` | ``hard`` | ``none``
            (see :mod:`kd_nnp.teachers.reference`).
        hard_reference: hard-energy alignment, ``none`` (default: MPtrj-PBE labels are on
            CHGNet's own scale) | ``student`` (per-element shift onto the pretrained
            student's energies, for DFT labels on another absolute scale such as vdW-DF2).
            With both ``hard_reference=student`` and ``reference=hard`` the soft energies
            are aligned onto the *aligned* hard energies.
        use_hard / use_soft: ignore hard or soft labels entirely (e.g. soft-only sweeps
            still *evaluate* hard MAE when this stays True; set False to drop them).
        max_atoms: skip frames larger than this.
        force_atoms: force terms and force metrics use M atoms per frame (stratified by
            element, drawn from the frame's content hash and ``force_seed``, see
            :func:`kd_nnp.training.features.select_force_atoms`) instead of all N; the
            cached backend then stores only their Jacobian columns (O(N M) instead of
            O(N^2)). None: every atom. The same frame gets the same atoms in every job.
        force_seed: seed of that choice (independent of ``seed``, so sweep jobs with other
            splits share the force caches).
        stress_mode: ``affine`` (chgnet's stress: every atom follows the strain) or
            ``molecular`` (molecules move rigidly with the cell: stress targets become
            ``sigma + offsets^T F / V`` from the label's stress and forces, predictions the
            same derivative of the student, exactly). The molecular stress leaves out the
            covalent-bond terms that the student's own relaxation removes (docs/demo.md).
        graph_cache / student_model: cache folder and the CHGNet version whose converter
            and (for ``reference=student``) pretrained energies are used.
    """

    def __init__(
        self,
        store: str,
        label_set: str | None = None,
        n_train: int | None = None,
        val_fraction: float = 0.1,
        n_val: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        grouped: bool = True,
        reference: str = "student",
        hard_reference: str = "none",
        use_hard: bool = True,
        use_soft: bool = True,
        max_atoms: int | None = None,
        force_atoms: int | None = None,
        force_seed: int = 0,
        stress_mode: str = "affine",
        graph_cache: str | None = None,
        student_model: str = "0.3.0",
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.store_path = Path(store)
        self.label_set = label_set
        self.n_train = n_train
        self.val_fraction = val_fraction
        self.n_val = n_val
        self.seed = seed
        self.batch_size = batch_size
        self.grouped = grouped
        self.reference_method = reference
        if hard_reference not in HARD_REFERENCE_METHODS:
            raise ValueError(
                f"unknown data.hard_reference {hard_reference!r}: use "
                + " or ".join(HARD_REFERENCE_METHODS)
            )
        self.hard_reference_method = hard_reference
        self.use_hard = use_hard
        self.use_soft = use_soft
        self.max_atoms = max_atoms
        if force_atoms is not None and int(force_atoms) < 1:
            raise ValueError(
                f"data.force_atoms must be >= 1 or null (all atoms), got {force_atoms}"
            )
        self.force_atoms = None if force_atoms is None else int(force_atoms)
        self.force_seed = int(force_seed)
        if stress_mode not in ("affine", "molecular"):
            raise ValueError(f"data.stress_mode must be affine or molecular, got {stress_mode!r}")
        self.stress_mode = stress_mode
        self.graph_cache_dir = graph_cache
        self.student_model = student_model
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.reference: ElementReference | None = None
        self.hard_reference: ElementReference | None = None
        self.unaligned: list[str] = []
        self.hard_unaligned: list[str] = []
        self.feature_loader: Any = None
        self.summary: dict[str, Any] = {}

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        store = FrameStore(self.store_path)
        frames = list(store.iter_frames())
        soft: dict[str, Labels] = {}
        if self.use_soft and self.label_set:
            from kd_nnp.teachers.label import resolve_label_set

            # a module:factory teacher's set is stored as label_set_name(spec)
            self.label_set = resolve_label_set(store, str(self.label_set))
            soft = store.labels(self.label_set).load()
        usable: list[Frame] = []
        skipped = {"too_large": 0, "no_labels": 0}
        for fr in frames:
            if self.max_atoms is not None and fr.n_atoms > self.max_atoms:
                skipped["too_large"] += 1
                continue
            has_hard = self.use_hard and fr.hard is not None
            if not has_hard and fr.frame_id not in soft:
                skipped["no_labels"] += 1
                continue
            usable.append(fr)
        if len(usable) < 2:
            raise ValueError(
                f"{self.store_path}: only {len(usable)} usable labelled frames "
                f"(label set {self.label_set!r}; skipped {skipped})"
            )
        by_id = {fr.frame_id: fr for fr in usable}
        pool, val_ids = split_frames(
            [fr.frame_id for fr in usable],
            [fr.group_id for fr in usable],
            val_fraction=self.val_fraction,
            n_val=self.n_val,
            seed=self.seed,
            grouped=self.grouped,
        )
        if self.n_train is not None:
            if self.n_train > len(pool):
                raise ValueError(
                    f"n_train={self.n_train} but only {len(pool)} training frames are available "
                    f"in {self.store_path} after the validation split"
                )
            pool = pool[: self.n_train]
        gcache = GraphCache(self.graph_cache_dir)

        def make(fid: str) -> Sample:
            fr = by_id[fid]
            key, path = gcache.get(fr.atoms, graph_id=fid)
            numbers = np.asarray(fr.atoms.numbers)
            offsets = volume = None
            if self.stress_mode == "molecular":
                try:
                    offsets = molecule_offsets(fr.atoms)
                    volume = float(fr.atoms.get_volume())
                except ValueError as exc:  # a covalent network: no molecules to keep rigid
                    raise ValueError(
                        f"{self.store_path}: frame {fid}: data.stress_mode=molecular needs "
                        f"molecules ({exc}); use stress_mode=affine or drop the frame"
                    ) from exc
            return Sample(
                mol_offsets=offsets,
                volume=volume,
                force_index=select_force_atoms(numbers, self.force_atoms, key, self.force_seed),
                frame_id=fid,
                graph_key=key,
                graph_path=path,
                numbers=numbers,
                hard=fr.hard if self.use_hard else None,
                soft=soft.get(fid),
                info=fr.info,
            )

        self.train_samples = [make(f) for f in pool]
        self.val_samples = [make(f) for f in val_ids]
        self._fit_hard_reference()
        self._fit_reference()
        self.summary = {
            "store": str(self.store_path),
            "label_set": self.label_set,
            "n_frames_store": len(frames),
            "skipped": skipped,
            "n_train": len(self.train_samples),
            "n_val": len(self.val_samples),
            "train_groups": sorted({by_id[s.frame_id].group_id for s in self.train_samples}),
            "val_groups": sorted({by_id[s.frame_id].group_id for s in self.val_samples}),
            "graphs_built": gcache.n_built,
            "force_atoms": self.force_atoms,
            "force_seed": self.force_seed,
            "stress_mode": self.stress_mode,
            "reference": self.reference.to_dict() if self.reference else None,
            "soft_energy_unaligned_frames": self.unaligned,
            "hard_reference": self.hard_reference.to_dict() if self.hard_reference else None,
            "hard_energy_unaligned_frames": self.hard_unaligned,
            "available": {f"{k[0]}_{k[1]}": v for k, v in self.available().items()},
        }
        log.info("data: %s", {k: v for k, v in self.summary.items() if "groups" not in k})

    def _hard_energy(self, s: Sample) -> float | None:
        """The hard energy the losses see (after the hard alignment; None when masked)."""
        if s.hard is None or s.hard.energy is None or s.hard_energy_masked:
            return None
        return s.hard_energy_aligned if s.hard_energy_aligned is not None else s.hard.energy

    def _fit_hard_reference(self) -> None:
        """Per-element shift of the hard energies onto the pretrained student's scale."""
        self.hard_unaligned = []
        train_hard = [
            s for s in self.train_samples if s.hard is not None and s.hard.energy is not None
        ]
        if self.hard_reference_method == "none" or not train_hard:
            self.hard_reference = ElementReference("none")
            return
        target = self._pretrained_energies(train_hard)
        self.hard_reference = fit_element_reference(
            [s.numbers for s in train_hard],
            [s.hard.energy for s in train_hard],
            target,
            "student",
        )
        for s in self.train_samples + self.val_samples:
            if s.hard is not None and s.hard.energy is not None:
                if self.hard_reference.identifiable(s.numbers):
                    s.hard_energy_aligned = self.hard_reference.apply(s.numbers, s.hard.energy)
                else:  # undetermined correction: no hard energy label for this frame
                    s.hard_energy_masked = True
                    self.hard_unaligned.append(s.frame_id)
        if self.hard_unaligned:
            log.warning(
                "%d frame(s) have compositions outside the span of the training compositions; "
                "their hard energies are masked (hard reference cannot align them): %s",
                len(self.hard_unaligned),
                self.hard_unaligned[:5],
            )

    def _fit_reference(self) -> None:
        train_soft = [
            s for s in self.train_samples if s.soft is not None and s.soft.energy is not None
        ]
        method = self.reference_method
        if not train_soft or method == "none":
            self.reference = ElementReference("none")
        elif method == "hard":
            pairs = [s for s in train_soft if self._hard_energy(s) is not None]
            if not pairs:
                raise ValueError(
                    "reference=hard but no training frame has both hard and soft energy"
                )
            self.reference = fit_element_reference(
                [s.numbers for s in pairs],
                [s.soft.energy for s in pairs],
                [self._hard_energy(s) for s in pairs],
                "hard",
            )
        elif method == "student":
            target = self._pretrained_energies(train_soft)
            self.reference = fit_element_reference(
                [s.numbers for s in train_soft],
                [s.soft.energy for s in train_soft],
                target,
                "student",
            )
        else:
            raise ValueError(f"unknown data.reference {method!r}: use student, hard or none")
        self.unaligned: list[str] = []
        for s in self.train_samples + self.val_samples:
            if s.soft is not None and s.soft.energy is not None:
                if self.reference.identifiable(s.numbers):
                    s.soft_energy_aligned = self.reference.apply(s.numbers, s.soft.energy)
                else:  # correction undetermined by the training compositions: no energy label
                    self.unaligned.append(s.frame_id)
        if self.unaligned:
            log.warning(
                "%d frame(s) have compositions outside the span of the training compositions; "
                "their soft energies are masked (reference cannot align them): %s",
                len(self.unaligned),
                self.unaligned[:5],
            )

    def _pretrained_energies(self, samples: Sequence[Sample]) -> list[float]:
        """Total energies of the pretrained student on these frames (cached per graph)."""
        from kd_nnp.teachers.calculators import load_chgnet

        cache_file = (
            Path(self.graph_cache_dir) if self.graph_cache_dir else cache_dir() / "graphs"
        ) / f"pretrained_energy_{self.student_model}.json"
        known: dict[str, float] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        todo = [s for s in samples if s.graph_key not in known]
        if todo:
            model = load_chgnet(self.student_model).eval()
            for i in range(0, len(todo), 16):
                chunk = todo[i : i + 16]
                graphs = [GraphCache.load(s.graph_path) for s in chunk]
                with torch.no_grad():
                    e = model(graphs, task="e")["e"].numpy()
                for s, ei in zip(chunk, e):
                    known[s.graph_key] = float(ei) * s.n_atoms
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache_file)
        return [known[s.graph_key] for s in samples]

    def available(self) -> dict[tuple[str, str], int]:
        """Number of training frames carrying each (target, quantity)."""
        out: dict[tuple[str, str], int] = {}
        for target in ("hard", "soft"):
            for q, attr in (("energy", "energy"), ("forces", "forces"), ("stress", "stress")):
                out[(target, q)] = sum(
                    1
                    for s in self.train_samples
                    if (lab := (s.hard if target == "hard" else s.soft)) is not None
                    and getattr(lab, attr) is not None
                )
        return out

    # ----------------------------------------------------------------- loaders
    def _loader(self, samples: list[Sample], shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            FramesDataset(samples, self.feature_loader),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=gen if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, False)

"""``FramesDataModule``: labelled frames from a store -> cached CHGNet graphs -> batches.

- reads frames (hard labels) and one teacher label set (soft labels) from a
  :class:`~kd_nnp.data.store.FrameStore`, or several with weights (multi-teacher soft
  targets: each set aligned per element on its own, then one weighted-mean target,
  :func:`parse_label_sets`);
- splits off a validation set (grouped by ``group_id`` so no material/trajectory is in both),
  then draws ``n_train`` training frames from a seeded permutation of the rest, so that for a
  given seed the Ntrain=100 set is inside the Ntrain=500 set (nested subsets share caches;
  :func:`kd_nnp.training.split.split_frames`);
- aligns soft energies with a per-element reference fitted on the training frames only
  (:mod:`kd_nnp.training.reference`), recorded in ``reference`` and in the run folder; hard
  energies likewise when ``hard_reference="student"`` (DFT labels on another absolute scale
  than the student's, e.g. vdW-DF2; the default ``none`` leaves them untouched);
- optionally adds *replay frames* to the training frames only (``replay_store``: pretrained
  CHGNet's own labels on inorganic crystals, a third target next to hard and soft, never
  aligned, never in the validation split, ``n_train`` or the reference fits);
- converts structures to CHGNet graphs once, cached on disk by content hash
  (:class:`~kd_nnp.training.cache.graphs.GraphCache`), so epochs, Ntrain subsets and sweep
  jobs reuse them; the pretrained student's energies (``reference=student``) likewise
  (:func:`kd_nnp.training.cache.energies.pretrained_energies`);
- collates :class:`~kd_nnp.training.batch.Batch` objects (the batch contract).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError
from kd_nnp.errors import SettingsError
from kd_nnp.training.batch import Batch, Targets
from kd_nnp.training.cache.energies import pretrained_energies
from kd_nnp.training.cache.graphs import GraphCache, prebuild_graphs
from kd_nnp.training.jacobian import select_force_atoms
from kd_nnp.training.progress import ProgressLog
from kd_nnp.training.reference import ElementReference, fit_element_reference
from kd_nnp.training.split import split_frames
from kd_nnp.training.stress import EV_PER_A3_TO_GPA, molecular_stress, molecule_offsets

log = logging.getLogger(__name__)

HARD_REFERENCE_METHODS = ("none", "student")


# --------------------------------------------------------------------------- samples
@dataclass
class Sample:
    frame_id: str
    graph_key: str
    graph_path: Path
    numbers: np.ndarray
    hard: Labels | None
    soft: Labels | None
    # a replay frame's labels (data.replay_store): pretrained CHGNet's own, used as they are
    replay: Labels | None = None
    # the energies the losses see, after the reference alignments (None: no label, or a
    # composition outside the span of the fitted reference, whose energy is masked)
    hard_energy: float | None = None
    soft_energy: float | None = None
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


def _targets(samples: Sequence[Sample], target: str, n_atoms: Sequence[int]) -> Targets:
    """The ``target`` ("hard" | "soft" | "replay") labels of ``samples`` with their masks.

    Hard and soft energies are the aligned ones (``hard_energy``/``soft_energy``); replay
    energies are the labels' own (pretrained CHGNet's scale, the student's at the start)."""
    out = Targets.empty(len(samples), int(sum(n_atoms)))
    offset = 0
    for i, (smp, n) in enumerate(zip(samples, n_atoms)):
        lab = getattr(smp, target)
        if lab is not None:
            energy = {"hard": smp.hard_energy, "soft": smp.soft_energy}.get(target, lab.energy)
            if energy is not None:
                out.energy[i] = energy / n
                out.energy_mask[i] = True
            if lab.forces is not None:
                out.forces[offset : offset + n] = torch.tensor(np.asarray(lab.forces))
                if smp.force_index is None:
                    out.forces_mask[offset : offset + n] = True
                else:  # subsampled force atoms: only their components count
                    out.forces_mask[offset + torch.as_tensor(smp.force_index, dtype=torch.long)] = (
                        True
                    )
            if lab.stress is not None and smp.mol_offsets is None:
                out.stress[i] = torch.as_tensor(lab.stress * EV_PER_A3_TO_GPA, dtype=torch.float32)
                out.stress_mask[i] = True
            elif lab.stress is not None and lab.forces is not None:  # molecule-rigid stress
                mol = molecular_stress(lab.stress, lab.forces, smp.mol_offsets, smp.volume)
                out.stress[i] = torch.as_tensor(mol * EV_PER_A3_TO_GPA, dtype=torch.float32)
                out.stress_mask[i] = True
        offset += n
    return out


def collate(items: list[dict[str, Any]]) -> Batch:
    samples = [it["sample"] for it in items]
    n_atoms = [s.n_atoms for s in samples]
    cached = all(it["features"] is not None for it in items)
    molecular = any(s.mol_offsets is not None for s in samples)  # full backend's molecular stress
    # replay frames keep chgnet's affine stress: zero offsets make the molecular correction 0
    offsets = [np.zeros((s.n_atoms, 3)) if s.mol_offsets is None else s.mol_offsets
               for s in samples]  # fmt: skip
    return Batch(
        frame_ids=[s.frame_id for s in samples],
        n_atoms=torch.as_tensor(n_atoms, dtype=torch.long),
        hard=_targets(samples, "hard", n_atoms),
        soft=_targets(samples, "soft", n_atoms),
        replay=_targets(samples, "replay", n_atoms),
        # the full path needs every graph of the batch; the cached path needs none
        graphs=None
        if cached
        else [it["graph"] or GraphCache.load(it["sample"].graph_path) for it in items],
        features=[it["features"] for it in items] if cached else None,
        mol_offsets=torch.as_tensor(np.concatenate(offsets), dtype=torch.float32)
        if molecular
        else None,
        volumes=torch.as_tensor(
            [1.0 if s.volume is None else s.volume for s in samples], dtype=torch.float32
        )
        if molecular
        else None,
    )


# --------------------------------------------------------------------------- leakage guard
def excluded_molecules(spec: str | Sequence[str] | None) -> dict[str, Any] | None:
    """``data.exclude_molecules`` read: ``{"source", "keys", "n_molecules", "sha"}`` (``sha``:
    a hash of the sorted keys, part of a run's relaunch fingerprint, so the same file name
    with other contents is another job); None when unset."""
    if spec is None:
        return None
    from kd_nnp.data.molecules import read_molecule_keys
    from kd_nnp.utils.provenance import stable_hash

    keys = read_molecule_keys(spec)
    source = spec if isinstance(spec, str) else "list"
    return {"source": source, "keys": keys, "n_molecules": len(keys), "sha": stable_hash(keys)}


def replay_fingerprint(store: str | Path | None, label_set: str) -> dict[str, Any] | None:
    """What the replay frames of ``data.replay_store`` are, beyond the path: ``{"n_frames",
    "n_labelled", "sha"}`` (``sha``: a hash of the frame ids, the labelled ids and the label
    set's provenance hash), part of a run's relaunch fingerprint (``config.yaml:
    data_replay``), so the same path with other frames or labels is another job. None
    without a replay store; a path that is no store is refused naming the setting."""
    if store in (None, ""):
        return None
    from kd_nnp.teachers.label import resolve_label_set
    from kd_nnp.utils.provenance import stable_hash

    try:
        fs = FrameStore(store)
    except StoreError as exc:
        raise SettingsError(f"data.replay_store={store}: {exc}") from exc
    ids = fs.frame_ids()
    name = resolve_label_set(fs, str(label_set))
    labels = fs.labels(name, create=True)  # a missing set: no labelled frame (refused later)
    ok = sorted(k for k, v in labels.status().items() if v == "ok")
    prov = labels.provenance.get("hash")
    return {"n_frames": len(ids), "n_labelled": len(ok), "sha": stable_hash([ids, ok, prov])}


def drop_molecules(frames: list[Frame], keys: set[str]) -> tuple[list[Frame], list[Frame]]:
    """``(kept, dropped)``: frames containing any molecule of ``keys`` are dropped."""
    from kd_nnp.data.molecules import frame_molecule_keys

    kept: list[Frame] = []
    dropped: list[Frame] = []
    for fr in frames:
        (dropped if frame_molecule_keys(fr.atoms, fr.info) & keys else kept).append(fr)
    return kept, dropped


def parse_label_sets(spec: Any) -> dict[str, float] | None:
    """``data.label_set`` as ``{name: weight}``: a name (one teacher, weight 1), a mapping of
    names to weights (several teachers), or None (no soft labels).

    Weights must be finite and >= 0 with at least one > 0; they need not sum to 1 (the target
    is the weighted mean). A set of weight 0 is left out entirely, so ``{a: 1, b: 0}`` is the
    one-teacher run of ``a``.
    """
    if spec is None or (isinstance(spec, str) and not spec):
        return None
    if isinstance(spec, str):
        return {spec: 1.0}
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(
            f"data.label_set must be a label-set name or a mapping of names to weights "
            f"(e.g. {{so3lr: 0.5, chgnet_d3: 0.5}}), got {spec!r}"
        )
    weights: dict[str, float] = {}
    for name, w in spec.items():
        try:
            wf = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"data.label_set: weight of {name!r} is not a number: {w!r}") from None
        if not np.isfinite(wf) or wf < 0:
            raise ValueError(
                f"data.label_set: weight of {name!r} must be finite and >= 0, got {w!r}"
            )
        weights[str(name)] = wf
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"data.label_set: every weight is 0 ({weights}); give one a weight > 0")
    return weights


def mix_labels(labels: Sequence[Labels], weights: Sequence[float]) -> Labels:
    """The weighted mean of several teachers' labels of one frame: energy (raw, the losses use
    the per-set-aligned mean instead), forces and stress; a quantity one teacher lacks is
    left out (None), so the mixed forces and stress stay the derivatives of the mixed energy."""
    w = np.asarray(weights, dtype=float) / float(np.sum(weights))

    def mean(attr: str) -> Any:
        vals = [getattr(lab, attr) for lab in labels]
        if any(v is None for v in vals):
            return None
        return sum(wi * np.asarray(v, dtype=float) for wi, v in zip(w, vals))

    energy = mean("energy")
    return Labels(None if energy is None else float(energy), mean("forces"), mean("stress"))


# --------------------------------------------------------------------------- datamodule
class FramesDataModule(L.LightningDataModule):
    """Labelled frames for distillation.

    Args:
        store: path of a frames store (``kd-nnp data ...``).
        label_set: name of the teacher label set (``STORE/labels/<name>.db``); None for
            hard-only training; or a mapping ``{name: weight}`` of several label sets
            (multi-teacher soft targets, :func:`parse_label_sets`): each set's energies are
            aligned per element on their own (``reference``), the soft target is the weighted
            mean of the aligned energies and of the forces and stresses (so the target forces
            stay the derivative of the target energy), and only frames that every set of
            weight > 0 labels get a soft label (the others are counted in
            ``summary["skipped"]["incomplete_label_sets"]``).
        n_train: number of training frames (None: all of the training pool).
        val_fraction / n_val: size of the validation split.
        seed: draws the split and the training subset.
        shuffle_seed: seed of the training batch order; None: ``seed`` (a committee's heads
            share one split and differ in it, :mod:`kd_nnp.training.committee`).
        grouped: split by ``group_id`` (no group in both train and validation).
        reference: soft-energy alignment, ``student`` | ``hard`` | ``none``
            (see :mod:`kd_nnp.training.reference`).
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
            :func:`kd_nnp.training.jacobian.select_force_atoms`) instead of all N; the
            cached backend then stores only their Jacobian columns (O(N M) instead of
            O(N^2)). None: every atom. The same frame gets the same atoms in every job.
        force_seed: seed of that choice (independent of ``seed``, so sweep jobs with other
            splits share the force caches).
        stress_mode: ``affine`` (chgnet's stress: every atom follows the strain) or
            ``molecular`` (molecules move rigidly with the cell: stress targets become
            ``sigma + offsets^T F / V`` from the label's stress and forces, predictions the
            same derivative of the student, exactly). The molecular stress leaves out the
            covalent-bond terms that the student's own relaxation removes (docs/demo.md).
        exclude_molecules: molecule keys (:func:`kd_nnp.data.molecules.graph_key`) whose
            frames are dropped before the split: a list, or a JSON / text file of them
            (:func:`kd_nnp.data.molecules.read_molecule_keys`), e.g. the held-out or
            cross-validation test molecules, so no crystal of a test molecule (a generated
            packing, a perturbed frame) reaches training. A frame's molecules are its
            ``info["mol_keys"]`` or are computed from its atoms; the dropped count is in
            ``summary["excluded"]``.
        replay_store: a second store whose frames join the *training* frames as replay
            frames (docs/evaluation.md, "Replay frames": ``kd-nnp data inorganic`` labelled
            with ``teacher=chgnet``), so the student keeps pretrained CHGNet's energies,
            forces and stresses outside organic crystals (loss ratios ``r_re``, ``r_rf``,
            ``r_rs``). Their labels are a third target (``Batch.replay``): never aligned by
            a reference (they are on pretrained CHGNet's scale, the student's at the
            start), not in the validation split, not counted in ``n_train``, not in the
            reference fits; shuffled together with the training frames. Their hard labels,
            if any, are not read. ``max_atoms``, ``force_atoms`` and ``exclude_molecules``
            apply to them too; their stress stays chgnet's affine one under
            ``stress_mode=molecular``. None: no replay.
        replay_label_set: the replay store's label set (default ``chgnet``).
        replay_n: a seeded subset (``seed``) of that many replay frames (nested like
            ``n_train``); None: every labelled replay frame.
        graph_cache / student_model: cache folder and the CHGNet version whose converter
            and (for ``reference=student``) pretrained energies are used.
        cache_workers: processes (one thread each) that build the missing graphs and
            pretrained energies in :meth:`setup`; ``kd-nnp train`` passes its
            ``feature_workers``. Same files and numbers as one process.
    """

    def __init__(
        self,
        store: str,
        label_set: str | Mapping[str, float] | None = None,
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
        exclude_molecules: str | Sequence[str] | None = None,
        replay_store: str | None = None,
        replay_label_set: str = "chgnet",
        replay_n: int | None = None,
        graph_cache: str | None = None,
        student_model: str = "0.3.0",
        num_workers: int = 0,
        cache_workers: int = 1,
        shuffle: bool = True,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.store_path = Path(store)
        self.label_set: Any = label_set
        self.label_weights = parse_label_sets(label_set)
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
        self.exclude_molecules = exclude_molecules
        self.replay_store = None if replay_store in (None, "") else Path(replay_store)
        if not replay_label_set:
            raise SettingsError("data.replay_label_set must name a label set (e.g. chgnet)")
        self.replay_label_set = str(replay_label_set)
        if replay_n is not None and (int(replay_n) != replay_n or int(replay_n) < 1):
            raise SettingsError(f"data.replay_n must be >= 1 or null (all), got {replay_n}")
        if replay_n is not None and self.replay_store is None:
            raise SettingsError(f"data.replay_n={replay_n} but data.replay_store is not set")
        self.replay_n = None if replay_n is None else int(replay_n)
        self.graph_cache_dir = graph_cache
        self.student_model = student_model
        self.num_workers = num_workers
        if int(cache_workers) < 1:
            raise SettingsError(f"cache_workers must be >= 1, got {cache_workers}")
        self.cache_workers = int(cache_workers)
        self.shuffle = shuffle
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.replay_samples: list[Sample] = []  # training only (data.replay_store)
        # one reference; with several label sets {name: {weight, reference...}}
        self.reference: ElementReference | dict[str, Any] | None = None
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
        skipped = {"too_large": 0, "no_labels": 0}
        self._soft_sets: dict[str, dict[str, Labels]] = {}
        if self.use_soft and self.label_weights:
            from kd_nnp.teachers.label import resolve_label_set

            # a module:factory teacher's set is stored as label_set_name(spec)
            weights = {resolve_label_set(store, name): w for name, w in self.label_weights.items()}
            unused = sorted(n for n, w in weights.items() if w == 0)
            self.label_weights = {n: w for n, w in weights.items() if w > 0}
            if len(self.label_weights) == 1 and isinstance(self.label_set, str):
                self.label_set = next(iter(self.label_weights))
            else:
                self.label_set = dict(weights)
            self._soft_sets = {n: store.labels(n).load() for n in self.label_weights}
            if unused:
                log.info("data: label set(s) %s have weight 0 and are not read", unused)
            if len(self._soft_sets) == 1:
                soft = next(iter(self._soft_sets.values()))
            else:
                sets = list(self._soft_sets.values())
                common = set(sets[0]).intersection(*sets[1:])
                incomplete = set().union(*sets) - common
                skipped["incomplete_label_sets"] = len(incomplete)
                if incomplete:
                    log.warning(
                        "data: %d frame(s) are labelled by some but not all of the label sets "
                        "%s; they get no soft label (e.g. %s)",
                        len(incomplete), list(self._soft_sets), sorted(incomplete)[:3],
                    )  # fmt: skip
                w = list(self.label_weights.values())
                soft = {fid: mix_labels([s[fid] for s in sets], w) for fid in common}
        usable: list[Frame] = []
        excluded = excluded_molecules(self.exclude_molecules)
        excluded_keys = set() if excluded is None else set(excluded["keys"])
        if excluded is not None:
            frames, dropped = drop_molecules(frames, excluded_keys)
            skipped["excluded_molecule"] = len(dropped)
            excluded = {k: v for k, v in excluded.items() if k != "keys"}
            excluded.update(n_frames=len(dropped), groups=sorted({f.group_id for f in dropped}))
            log.info(
                "data: %d frames of %d excluded molecules dropped (%s)",
                len(dropped), excluded["n_molecules"], excluded["source"],
            )  # fmt: skip
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

        progress = ProgressLog(log, "graph cache", len(pool) + len(val_ids))
        if self.cache_workers > 1:  # build the missing graphs in parallel; make() then reads them
            prebuild_graphs(
                gcache, [(f, by_id[f].atoms) for f in [*pool, *val_ids]], self.cache_workers,
                progress,
            )  # fmt: skip

        def make_logged(fid: str) -> Sample:
            sample = make(fid)
            if self.cache_workers <= 1:
                progress.step()
            return sample

        self.train_samples = [make_logged(f) for f in pool]
        self.val_samples = [make_logged(f) for f in val_ids]
        replay = self._setup_replay(gcache, set(by_id), excluded_keys)
        self.hard_reference, self.hard_unaligned = self._align("hard", self.hard_reference_method)
        if len(self._soft_sets) > 1:
            self.reference, self.unaligned = self._align_mixed(self.reference_method)
        else:
            self.reference, self.unaligned = self._align("soft", self.reference_method)
        self.summary = {
            "store": str(self.store_path),
            "label_set": self.label_set,
            "n_frames_store": len(frames) + skipped.get("excluded_molecule", 0),
            "skipped": skipped,
            "excluded": excluded,
            "n_train": len(self.train_samples),
            "n_val": len(self.val_samples),
            "n_replay": len(self.replay_samples),
            "replay": replay,
            "train_groups": sorted({by_id[s.frame_id].group_id for s in self.train_samples}),
            "val_groups": sorted({by_id[s.frame_id].group_id for s in self.val_samples}),
            "graphs_built": gcache.n_built,
            "force_atoms": self.force_atoms,
            "force_seed": self.force_seed,
            "stress_mode": self.stress_mode,
            "label_weights": self.label_weights,
            "reference": (
                self.reference.to_dict()
                if isinstance(self.reference, ElementReference)
                else self.reference
            ),
            "soft_energy_unaligned_frames": self.unaligned,
            "hard_reference": self.hard_reference.to_dict() if self.hard_reference else None,
            "hard_energy_unaligned_frames": self.hard_unaligned,
            "available": {f"{k[0]}_{k[1]}": v for k, v in self.available().items()},
            "validation": self._validation_report(),
        }
        log.info("data: %s", {k: v for k, v in self.summary.items() if "groups" not in k})

    def _setup_replay(
        self, gcache: GraphCache, organic_ids: set[str], excluded_keys: set[str]
    ) -> dict[str, Any] | None:
        """Read ``replay_store`` into ``self.replay_samples`` (training only; see the class
        docstring); returns what ``summary["replay"]`` records (None without a replay store).
        A store that is missing, empty, without the label set or with no labelled frame is
        refused (:class:`SettingsError` naming the setting and the path)."""
        self.replay_samples = []
        if self.replay_store is None:
            return None
        where = f"data.replay_store={self.replay_store}"
        try:
            store = FrameStore(self.replay_store)
            frames = list(store.iter_frames())
            if not frames:
                raise SettingsError(
                    f"{where} holds no frames; build it with `kd-nnp data inorganic --out "
                    f"{self.replay_store}` and label it with teacher=chgnet"
                )
            from kd_nnp.teachers.label import resolve_label_set

            name = resolve_label_set(store, self.replay_label_set)
            labels = store.labels(name).load()
        except StoreError as exc:
            raise SettingsError(
                f"{where} (data.replay_label_set={self.replay_label_set}): {exc}"
            ) from exc
        if not labels:
            raise SettingsError(
                f"{where}: label set {name!r} labels none of its {len(frames)} frames; run "
                f"`kd-nnp label store={self.replay_store} teacher=chgnet`"
            )
        shared = sorted(organic_ids & {fr.frame_id for fr in frames})
        if shared:
            raise SettingsError(
                f"{where} shares {len(shared)} frame id(s) with data.store={self.store_path} "
                f"(e.g. {shared[:3]}): a frame cannot be both a training and a replay frame"
            )
        skipped = {"too_large": 0, "no_labels": 0, "excluded_molecule": 0}
        usable: list[Frame] = []
        for fr in frames:
            if fr.frame_id not in labels:
                skipped["no_labels"] += 1
            elif self.max_atoms is not None and fr.n_atoms > self.max_atoms:
                skipped["too_large"] += 1
            elif excluded_keys and drop_molecules([fr], excluded_keys)[1]:
                skipped["excluded_molecule"] += 1
            else:
                usable.append(fr)
        if not usable:
            raise SettingsError(f"{where}: no usable replay frame (skipped: {skipped})")
        if skipped["no_labels"]:
            log.warning(
                "replay: %d of the %d frames of %s have no %r label and are left out",
                skipped["no_labels"], len(frames), self.replay_store, name,
            )  # fmt: skip
        if self.replay_n is not None:
            if self.replay_n > len(usable):
                raise SettingsError(
                    f"data.replay_n={self.replay_n} but {where} has only {len(usable)} usable "
                    "labelled frames"
                )
            # a seeded permutation, so that for one seed a smaller subset is inside a larger one
            order = np.random.default_rng(self.seed).permutation(len(usable))
            usable = [usable[i] for i in sorted(order[: self.replay_n])]
        for fr in usable:
            key, path = gcache.get(fr.atoms, graph_id=fr.frame_id)
            numbers = np.asarray(fr.atoms.numbers)
            self.replay_samples.append(
                Sample(
                    frame_id=fr.frame_id,
                    graph_key=key,
                    graph_path=path,
                    numbers=numbers,
                    hard=None,
                    soft=None,
                    replay=labels[fr.frame_id],
                    info=fr.info,
                    force_index=select_force_atoms(numbers, self.force_atoms, key, self.force_seed),
                )
            )
        record = {
            "store": str(self.replay_store),
            "label_set": name,
            "n_frames": len(self.replay_samples),
            "n_frames_store": len(frames),
            "replay_n": self.replay_n,
            "skipped": skipped,
            "groups": sorted({fr.group_id for fr in usable}),
        }
        log.info("replay: %s", {k: v for k, v in record.items() if k != "groups"})
        return record

    def _align_mixed(self, method: str) -> tuple[dict[str, Any], list[str]]:
        """Several label sets: each set's soft energies aligned on their own (:meth:`_align`
        with that set's energies), then the weighted mean of the aligned energies is the soft
        energy; a frame unaligned in any set gets none. Returns the references per set."""
        samples = self.train_samples + self.val_samples
        total = sum(self.label_weights.values())
        mixed = {s.frame_id: 0.0 for s in samples if s.soft is not None}
        refs: dict[str, Any] = {}
        unaligned: set[str] = set()
        for name, weight in self.label_weights.items():
            labels = self._soft_sets[name]
            for s in samples:
                s.soft_energy = None
            ref, _ = self._align(
                "soft", method, raw=lambda s, lab=labels: (  # type: ignore[misc]
                    None if s.soft is None or s.frame_id not in lab else lab[s.frame_id].energy
                ),
            )  # fmt: skip
            refs[name] = {"weight": weight, **ref.to_dict()}
            for s in samples:  # a frame this set cannot align (in ``bad``) has no soft_energy
                if s.frame_id in mixed:
                    if s.soft_energy is None:
                        unaligned.add(s.frame_id)
                    else:
                        mixed[s.frame_id] += weight / total * s.soft_energy
        for s in samples:
            if s.soft is not None:
                s.soft_energy = None if s.frame_id in unaligned else mixed[s.frame_id]
        return refs, sorted(unaligned)

    def _align(
        self, target: str, method: str, raw: Any = None
    ) -> tuple[ElementReference, list[str]]:
        """Fit one per-element reference of the ``target`` ("hard" or "soft") energies on the
        training frames and apply it to every frame.

        ``method``: ``student`` (onto the pretrained student's energies), ``hard`` (onto the
        hard energies the losses see, i.e. after the hard alignment) or ``none``. A frame whose
        composition lies outside the span of the fitted ones gets no energy label (its
        ``<target>_energy`` becomes None) and is returned in the list of unaligned frames.
        ``raw``: the energy of a sample to align (default: its ``target`` label's energy).
        """

        if raw is None:

            def raw(s: Sample) -> float | None:
                lab = s.hard if target == "hard" else s.soft
                return None if lab is None else lab.energy

        labelled = [s for s in self.train_samples if raw(s) is not None]
        if method == "none" or not labelled:
            ref = ElementReference("none")
        else:
            if method == "hard":
                fit_on = [s for s in labelled if s.hard_energy is not None]
                if not fit_on:
                    raise ValueError(
                        f"reference=hard but no training frame has both hard and {target} energy"
                    )
                goal = [s.hard_energy for s in fit_on]
            elif method == "student":
                fit_on = labelled
                goal = pretrained_energies(
                    fit_on, self.student_model, self.graph_cache_dir, self.cache_workers
                )
            else:
                raise ValueError(f"unknown data.reference {method!r}: use student, hard or none")
            log.info("%s energy reference (%s): fitting on %d frames", target, method, len(fit_on))
            ref = fit_element_reference(
                [s.numbers for s in fit_on], [raw(s) for s in fit_on], goal, method
            )
            log.info(
                "%s energy reference (%s): done, RMS %.4g -> %.4g eV/atom",
                target, method, ref.rmse_before, ref.rmse_after,
            )  # fmt: skip
        unaligned: list[str] = []
        for s in self.train_samples + self.val_samples:
            energy = raw(s)
            if energy is None:
                continue
            aligned = ref.apply(s.numbers, energy) if ref.identifiable(s.numbers) else None
            setattr(s, f"{target}_energy", aligned)
            if aligned is None:  # correction undetermined by the training compositions
                unaligned.append(s.frame_id)
        if unaligned:
            log.warning(
                "%d frame(s) have compositions outside the span of the training compositions; "
                "their %s energies are masked (the %s reference cannot align them): %s",
                len(unaligned), target, target, unaligned[:5],
            )  # fmt: skip
        return ref, unaligned

    def _validation_report(self) -> dict[str, Any]:
        """What the validation metrics can show: frames, energies masked by the references.

        Warns (and lists under ``problems``) when there is no validation frame or when every
        validation energy is masked, so a blank validation report never goes unexplained.
        Training goes on either way: only the validation metrics are affected.
        """
        val = self.val_samples
        unaligned = {"hard": set(self.hard_unaligned), "soft": set(self.unaligned)}
        report: dict[str, Any] = {"n_frames": len(val)}
        for target in ("hard", "soft"):
            report[f"{target}_energy_masked"] = sum(s.frame_id in unaligned[target] for s in val)
        report["energy_labelled"] = sum(
            s.hard_energy is not None or s.soft_energy is not None for s in val
        )
        problems = []
        if not val:
            asked = (
                f"data.n_val={self.n_val}"
                if self.n_val is not None
                else f"data.val_fraction={self.val_fraction}"
            )
            problems.append(
                f"no validation frames ({asked}): val/* metrics and the validation columns "
                "of the reports will be empty"
            )
        elif report["energy_labelled"] == 0:
            masked = report["hard_energy_masked"] + report["soft_energy_masked"]
            why = (
                "their compositions are outside the span of the training compositions, so "
                "the per-element energy reference cannot align them (data.reference="
                f"{self.reference_method}, data.hard_reference={self.hard_reference_method}); "
                "use a validation split whose compositions the training frames span, or "
                "data.grouped=false"
                if masked
                else "no validation frame carries an energy label"
            )
            problems.append(
                f"every validation energy is masked ({len(val)} of {len(val)} frames): {why}; "
                "val/mae_*_energy will be missing"
            )
        for problem in problems:
            log.warning("validation: %s", problem)
        report["problems"] = problems
        return report

    def max_batch_atoms(self) -> int:
        """Atoms in the largest batch a loader can make: the ``batch_size`` largest training
        frames (shuffled batches may bring them together), the validation batches as they
        come (in order)."""
        sizes = sorted((s.n_atoms for s in self.training_samples), reverse=True)
        largest = sum(sizes[: self.batch_size])
        val = [s.n_atoms for s in self.val_samples]
        for i in range(0, len(val), self.batch_size):
            largest = max(largest, sum(val[i : i + self.batch_size]))
        return largest

    @property
    def training_samples(self) -> list[Sample]:
        """What the training loader draws from: the training frames, then the replay frames
        (shuffled together by the loader)."""
        return self.train_samples + self.replay_samples

    def available(self) -> dict[tuple[str, str], int]:
        """Number of training frames (replay frames included) carrying each (target,
        quantity)."""
        out: dict[tuple[str, str], int] = {}
        for target in ("hard", "soft", "replay"):
            for q in ("energy", "forces", "stress"):
                out[(target, q)] = sum(
                    1
                    for s in self.training_samples
                    if (lab := getattr(s, target)) is not None and getattr(lab, q) is not None
                )
        return out

    # ----------------------------------------------------------------- loaders
    def _loader(self, samples: list[Sample], shuffle: bool, train: bool = False) -> DataLoader:
        """Under data-parallel training each rank gets its share from the sampler set here
        (Lightning keeps a ``DistributedSampler``; its own would shuffle the training frames
        even with ``shuffle=False``): training frames padded to a multiple of the world size
        (every rank takes the same number of steps), shuffled per epoch only when ``shuffle``,
        from ``seed``; validation/test frames each exactly once
        (:class:`kd_nnp.training.ddp.UnpaddedSampler`)."""
        seed = self.seed if self.shuffle_seed is None else self.shuffle_seed
        gen = torch.Generator().manual_seed(seed)
        dataset = FramesDataset(samples, self.feature_loader)
        sampler: Any = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            from torch.utils.data import DistributedSampler

            from kd_nnp.training.ddp import UnpaddedSampler

            world, rank = trainer.world_size, trainer.global_rank
            sampler = (
                DistributedSampler(dataset, world, rank, shuffle=shuffle, seed=seed)
                if train
                else UnpaddedSampler(dataset, world, rank)
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=gen if shuffle and sampler is None else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.training_samples, self.shuffle, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, False)

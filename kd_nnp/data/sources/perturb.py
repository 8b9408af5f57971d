"""Perturbation sets from crystals: strained cells, rattled copies, optional teacher MD.

This is how the embedded default gets training frames without DFT: the volume of a
molecular crystal lives in its energy-vs-strain curve, so most frames are *unrattled*
strained copies spanning about -8 % .. +20 % in volume, plus rattled copies for forces.

- Strains are applied *molecule-rigidly* by default (``mode="molecular"``): each molecule's
  centre moves with the cell, its internal geometry is kept, so strain probes
  intermolecular interactions rather than stretching covalent bonds. ``mode="affine"``
  scales all positions (use for non-molecular solids).
- ``n_strain`` unrattled strains: half an isotropic volume grid over ``volume_range``
  (endpoints included), half random anisotropic strains (random symmetric deviatoric part of
  amplitude ``shear``) with volumes drawn uniformly from the same range.
- ``n_rattle`` copies: a random anisotropic strain plus Gaussian displacements
  (``rattle_std`` A).
- ``n_md`` snapshots of a short Langevin MD with a teacher (optional, ``md_calc``).
- Everything is seeded per parent from ``(seed, parent_id)``: the same seed gives identical
  frames and ids, and adding other parents changes nothing for this one.

Frame ids: ``<parent_id>/parent``, ``<parent_id>/strain<k>``, ``<parent_id>/rattle<k>``,
``<parent_id>/md<k>``; group id = the parent's group id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.data.store import Frame, FrameStore, StoreError


@dataclass(frozen=True)
class PerturbSettings:
    n_strain: int = 8
    n_rattle: int = 4
    volume_range: tuple[float, float] = (-0.08, 0.20)
    shear: float = 0.03
    rattle_std: float = 0.04
    mode: str = "molecular"
    include_parent: bool = True
    n_md: int = 0
    md_steps_between: int = 10
    md_temperature: float = 300.0
    md_timestep_fs: float = 0.5
    seed: int = 0


# ---------------------------------------------------------------- molecules
def molecule_indices(atoms: Atoms, scale: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Label each atom with its molecule and give *unwrapped* positions.

    Returns ``(labels, unwrapped_positions)``; a covalent network that percolates through
    the cell (not molecular) raises ValueError.
    """
    from ase.neighborlist import natural_cutoffs, neighbor_list

    n = len(atoms)
    i, j, shifts = neighbor_list("ijS", atoms, natural_cutoffs(atoms, mult=scale))
    adj: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for a, b, s in zip(i, j, shifts):
        adj[a].append((b, s))
    labels = -np.ones(n, dtype=int)
    image = np.zeros((n, 3), dtype=int)
    mol = 0
    for start in range(n):
        if labels[start] >= 0:
            continue
        labels[start] = mol
        stack = [start]
        while stack:
            a = stack.pop()
            for b, s in adj[a]:
                img = image[a] + s
                if labels[b] < 0:
                    labels[b] = mol
                    image[b] = img
                    stack.append(b)
                elif not np.array_equal(image[b], img):
                    raise ValueError("bonded network percolates through the cell (not molecular)")
        mol += 1
    unwrapped = atoms.positions + image @ atoms.cell.array
    return labels, unwrapped


def molecule_centres(atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Molecule labels, unwrapped positions and, per atom, the geometric centre of its
    molecule (N, 3):
    the centre that molecule-rigid strains keep fixed relative to the cell (here and in the
    molecular stress of :mod:`kd_nnp.training.stress`)."""
    labels, pos = molecule_indices(atoms)
    centres = np.empty_like(pos)
    for m in np.unique(labels):
        sel = labels == m
        centres[sel] = pos[sel].mean(axis=0)
    return labels, pos, centres


def apply_strain(atoms: Atoms, strain: np.ndarray, mode: str = "molecular") -> Atoms:
    """Deform the cell by ``(I + strain)`` (cell rows are lattice vectors)."""
    deform = np.eye(3) + np.asarray(strain, dtype=float)
    new = atoms.copy()
    new.calc = None
    new_cell = atoms.cell.array @ deform
    if mode == "affine":
        new.set_cell(new_cell, scale_atoms=True)
        return new
    if mode != "molecular":
        raise ValueError(f"strain mode must be 'molecular' or 'affine', got {mode!r}")
    labels, pos, centres = molecule_centres(atoms)
    out = pos.copy()
    for m in np.unique(labels):
        sel = labels == m
        centre = centres[sel][0]
        out[sel] = pos[sel] - centre + centre @ deform
    new.set_cell(new_cell, scale_atoms=False)
    new.positions = out
    new.wrap()
    return new


def _volume_strain(rng: np.random.Generator, vol: float, shear: float) -> np.ndarray:
    """Symmetric strain with det(I + e) = 1 + vol and a random deviatoric part."""
    a = rng.normal(size=(3, 3)) * shear
    dev = 0.5 * (a + a.T)
    dev -= np.trace(dev) / 3 * np.eye(3)
    f = np.eye(3) + dev
    f *= ((1.0 + vol) / np.linalg.det(f)) ** (1 / 3)
    return f - np.eye(3)


def _rng(seed: int, parent_id: str) -> np.random.Generator:
    h = int(hashlib.sha256(parent_id.encode()).hexdigest()[:12], 16)
    return np.random.default_rng([int(seed), h])


# ---------------------------------------------------------------- teacher steps
def prerelax(atoms: Atoms, calc: Any, steps: int = 50, fmax: float = 0.1) -> tuple[Atoms, dict]:
    """Relax positions only (fixed cell) with a teacher: fixes X-ray H positions.

    Returns the relaxed copy and a record (steps, initial and final max force).
    """
    from ase.optimize import FIRE

    a = atoms.copy()
    a.calc = calc
    f0 = float(np.abs(a.get_forces()).max())
    opt = FIRE(a, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    f1 = float(np.linalg.norm(a.get_forces(), axis=1).max())
    out = a.copy()
    out.calc = None
    return out, {"prerelax_steps": int(opt.nsteps), "prerelax_fmax0": f0, "prerelax_fmax": f1}


def md_snapshots(
    atoms: Atoms,
    calc: Any,
    n: int,
    *,
    every: int,
    temperature: float,
    timestep_fs: float,
    rng: np.random.Generator,
) -> list[Atoms]:
    """``n`` snapshots of a Langevin NVT run (seeded through ``rng``)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    a = atoms.copy()
    a.calc = calc
    MaxwellBoltzmannDistribution(a, temperature_K=temperature, rng=rng)
    dyn = Langevin(a, timestep_fs * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    out = []
    for _ in range(n):
        dyn.run(every)
        snap = a.copy()
        snap.calc = None
        out.append(snap)
    return out


# ---------------------------------------------------------------- main entry
def expected_ids(parent_id: str, s: PerturbSettings) -> list[str]:
    ids = [f"{parent_id}/parent"] if s.include_parent else []
    ids += [f"{parent_id}/strain{k}" for k in range(s.n_strain)]
    ids += [f"{parent_id}/rattle{k}" for k in range(s.n_rattle)]
    ids += [f"{parent_id}/md{k}" for k in range(s.n_md)]
    return ids


def perturb_one(
    parent_id: str,
    atoms: Atoms,
    group_id: str,
    settings: PerturbSettings,
    *,
    source: str = "perturb",
    md_calc: Any = None,
    info: dict[str, Any] | None = None,
) -> list[Frame]:
    s = settings
    lo, hi = s.volume_range
    if not -0.5 < lo <= hi < 1.0:
        raise ValueError(f"volume_range {s.volume_range} must satisfy -0.5 < lo <= hi < 1")
    rng = _rng(s.seed, parent_id)
    base = dict(info or {})
    base["parent_id"] = parent_id
    frames: list[Frame] = []

    def add(kind: str, k: int | None, a: Atoms, extra: dict[str, Any]) -> None:
        fid = f"{parent_id}/{kind}" + ("" if k is None else str(k))
        meta = dict(base, perturbation=kind, **extra)
        meta["volume_strain"] = float(a.get_volume() / atoms.get_volume() - 1)
        frames.append(Frame(fid, a, group_id, source, None, meta))

    if s.include_parent:
        a = atoms.copy()
        a.calc = None
        add("parent", None, a, {})
    n_iso = s.n_strain // 2 + s.n_strain % 2
    grid = np.linspace(lo, hi, n_iso) if n_iso > 1 else np.array([0.5 * (lo + hi)])
    for k in range(s.n_strain):
        if k < n_iso:
            eps = ((1 + grid[k]) ** (1 / 3) - 1) * np.eye(3)
        else:
            eps = _volume_strain(rng, rng.uniform(lo, hi), s.shear)
        add("strain", k, apply_strain(atoms, eps, s.mode), {"strain": eps.ravel()})
    for k in range(s.n_rattle):
        eps = _volume_strain(rng, rng.uniform(lo, hi), s.shear)
        a = apply_strain(atoms, eps, s.mode)
        a.positions = a.positions + rng.normal(scale=s.rattle_std, size=a.positions.shape)
        add("rattle", k, a, {"strain": eps.ravel(), "rattle_std": s.rattle_std})
    if s.n_md:
        if md_calc is None:
            raise ValueError("n_md > 0 needs a teacher calculator (md_calc)")
        snaps = md_snapshots(
            atoms,
            md_calc,
            s.n_md,
            every=s.md_steps_between,
            temperature=s.md_temperature,
            timestep_fs=s.md_timestep_fs,
            rng=rng,
        )
        for k, a in enumerate(snaps):
            add("md", k, a, {"md_temperature": s.md_temperature})
    return frames


def make_perturbations(
    parents: Sequence[Frame] | Sequence[tuple[str, Atoms]],
    *,
    n_strain: int = 8,
    n_rattle: int = 4,
    seed: int = 0,
    volume_range: tuple[float, float] = (-0.08, 0.20),
    shear: float = 0.03,
    rattle_std: float = 0.04,
    mode: str = "molecular",
    include_parent: bool = True,
    n_md: int = 0,
    md_calc: Any = None,
    prerelax_calc: Any = None,
    prerelax_steps: int = 50,
    prerelax_fmax: float = 0.1,
    source: str = "perturb",
    **md_settings: Any,
) -> list[Frame]:
    """Perturbed frames of each parent (``Frame``s or ``(id, atoms)`` pairs).

    With ``prerelax_calc`` each parent is first relaxed at fixed cell (positions only) and
    the perturbations are built around the relaxed geometry.
    """
    settings = PerturbSettings(
        n_strain=n_strain,
        n_rattle=n_rattle,
        volume_range=tuple(volume_range),  # type: ignore[arg-type]
        shear=shear,
        rattle_std=rattle_std,
        mode=mode,
        include_parent=include_parent,
        n_md=n_md,
        seed=seed,
        **md_settings,
    )
    out: list[Frame] = []
    for p in parents:
        if isinstance(p, Frame):
            pid, atoms, group, info = p.frame_id, p.atoms, p.group_id, dict(p.info)
        else:
            pid, atoms = p
            group, info = pid, {}
        info = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        info.pop("parent_id", None)
        if prerelax_calc is not None:
            atoms, rec = prerelax(atoms, prerelax_calc, prerelax_steps, prerelax_fmax)
            info.update(rec)
        out += perturb_one(pid, atoms, group, settings, source=source, md_calc=md_calc, info=info)
    return out


def build_perturb_store(
    src: str,
    out: str,
    *,
    teacher: str | None = None,
    teacher_settings: dict | None = None,
    codes: Sequence[str] | None = None,
    limit: int | None = None,
    **kwargs: Any,
) -> tuple[int, int]:
    """Perturb every frame of store ``src`` into store ``out`` (resumable per parent).

    ``teacher`` (registry name) is used to pre-relax parents and drive MD. Returns
    ``(parents processed, frames written)``.
    """
    source = FrameStore(src)
    dest = FrameStore(out, create=True, description=f"perturbations of {src}")
    ids = source.frame_ids()
    if codes:
        wanted = set(codes)
        ids = [i for i in ids if i in wanted or i.split(":")[-1] in wanted]
        if not ids:
            raise StoreError(f"{src}: none of {sorted(wanted)} are frame ids of this store")
    if limit is not None:
        ids = ids[:limit]
    settings = {k: kwargs[k] for k in ("n_strain", "n_rattle", "n_md") if k in kwargs}
    s = PerturbSettings(**settings, include_parent=kwargs.get("include_parent", True))
    calc = None
    done = set(dest.frame_ids())
    n_parents = n_written = 0
    for frame in source.iter_frames(ids):
        if all(i in done for i in expected_ids(frame.frame_id, s)):
            continue
        if calc is None and teacher is not None:
            from kd_nnp.teachers.registry import load_teacher

            calc = load_teacher(teacher, **(teacher_settings or {})).calculator
        frames = make_perturbations(
            [frame],
            prerelax_calc=calc if kwargs.get("prerelax", True) else None,
            md_calc=calc,
            **{k: v for k, v in kwargs.items() if k != "prerelax"},
        )
        n_written += dest.add_frames(frames)
        n_parents += 1
    return n_parents, n_written

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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.data.molecules import MOL_KEYS_INFO, frame_molecule_keys, molecule_centres
from kd_nnp.data.store import Frame, FrameStore, StoreError, check_recipe
from kd_nnp.errors import SettingsError
from kd_nnp.utils.settings import as_dict, from_mapping

log = logging.getLogger(__name__)


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class PerturbSettings:
    """How each parent crystal is perturbed (one definition for the Python API, the
    ``kd-nnp data perturb`` options and the recipe a store remembers)."""

    n_strain: int = field(default=8, metadata=_h("unrattled strained copies per parent"))
    n_rattle: int = field(default=4, metadata=_h("strained + rattled copies per parent"))
    volume_range: tuple[float, float] = field(
        default=(-0.08, 0.20), metadata=_h("relative volume change range LO,HI")
    )
    shear: float = field(default=0.03, metadata=_h("anisotropic strain amplitude"))
    rattle_std: float = field(default=0.04, metadata=_h("rattle standard deviation (A)"))
    mode: str = field(default="molecular", metadata=_h("strain mode: molecular | affine"))
    include_parent: bool = field(default=True, metadata=_h("keep the parent frame"))
    n_md: int = field(default=0, metadata=_h("MD snapshots per parent (needs a calculator)"))
    md_steps_between: int = field(default=10, metadata=_h("MD steps between snapshots"))
    md_temperature: float = field(default=300.0, metadata=_h("MD temperature (K)"))
    md_timestep_fs: float = field(default=0.5, metadata=_h("MD time step (fs)"))
    prerelax_steps: int = field(
        default=50,
        metadata=_h("fixed-cell FIRE steps with the calculator before perturbing (0: none)"),
    )
    prerelax_fmax: float = field(default=0.1, metadata=_h("pre-relaxation force limit (eV/A)"))
    seed: int = field(default=0, metadata=_h("random seed (per parent: seed + parent id)"))

    def check(self) -> None:
        lo, hi = self.volume_range
        if len(self.volume_range) != 2 or not -0.5 < lo <= hi < 1.0:
            raise SettingsError(
                f"volume_range {self.volume_range} must be LO,HI with -0.5 < LO <= HI < 1"
            )
        if self.mode not in ("molecular", "affine"):
            raise SettingsError(f"strain mode must be 'molecular' or 'affine', not {self.mode!r}")
        for name in ("n_strain", "n_rattle", "n_md", "prerelax_steps"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------- molecules
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
    s.check()
    lo, hi = s.volume_range
    rng = _rng(s.seed, parent_id)
    base = dict(info or {})
    base["parent_id"] = parent_id
    if MOL_KEYS_INFO not in base:  # the molecules of the parent: the training guard reads them
        keys = frame_molecule_keys(atoms)
        if keys:
            base[MOL_KEYS_INFO] = ";".join(sorted(keys))
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
    settings: PerturbSettings | None = None,
    *,
    md_calc: Any = None,
    prerelax_calc: Any = None,
    source: str = "perturb",
    **overrides: Any,
) -> list[Frame]:
    """Perturbed frames of each parent (``Frame``s or ``(id, atoms)`` pairs).

    ``settings`` (default :class:`PerturbSettings`) with any field overridden by keyword
    (``n_strain=4, seed=1``). With ``prerelax_calc`` each parent is first relaxed at fixed
    cell (positions only, ``prerelax_steps``) and perturbed around the relaxed geometry.
    """
    s = settings or PerturbSettings()
    if overrides:
        s = from_mapping(PerturbSettings, {**as_dict(s), **overrides}, where="perturbation")
    out: list[Frame] = []
    for p in parents:
        if isinstance(p, Frame):
            pid, atoms, group, info = p.frame_id, p.atoms, p.group_id, dict(p.info)
        else:
            pid, atoms = p
            group, info = pid, {}
        info = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        info.pop("parent_id", None)
        if MOL_KEYS_INFO not in info:  # from the given structure: a teacher's pre-relaxation
            keys = frame_molecule_keys(atoms)  # can change a bond graph (SO3LR: TETBBZ C-Br)
            if keys:
                info[MOL_KEYS_INFO] = ";".join(sorted(keys))
        if prerelax_calc is not None and s.prerelax_steps > 0:
            atoms, rec = prerelax(atoms, prerelax_calc, s.prerelax_steps, s.prerelax_fmax)
            info.update(rec)
        out += perturb_one(pid, atoms, group, s, source=source, md_calc=md_calc, info=info)
    return out


RECIPE_FILE = "perturb.json"


def build_perturb_store(
    src: str,
    out: str,
    settings: PerturbSettings | None = None,
    *,
    calculator: Any = None,
    calculator_name: str | None = None,
    codes: Sequence[str] | None = None,
    limit: int | None = None,
) -> tuple[int, int]:
    """Perturb every frame of store ``src`` into store ``out`` (resumable per parent).

    ``calculator`` (an ASE calculator, or a callable that builds one, called only when a
    parent is left to do) pre-relaxes parents and drives MD; ``calculator_name`` names it in
    the recipe ``out/perturb.json``. A store keeps one recipe: a rerun with the same
    settings resumes, other settings are refused. Returns ``(parents processed, frames
    written)``.
    """
    s = settings or PerturbSettings()
    if s.n_md and calculator is None:
        raise SettingsError("n_md > 0 needs a calculator (--prerelax-teacher) for the MD")
    source = FrameStore(src)
    ids = source.frame_ids()
    if codes:
        wanted = set(codes)
        ids = [i for i in ids if i in wanted or i.split(":")[-1] in wanted]
        if not ids:
            raise StoreError(f"{src}: none of {sorted(wanted)} are frame ids of this store")
    if limit is not None:
        ids = ids[:limit]
    dest = FrameStore(out, create=True, description=f"perturbations of {src}")
    recipe = {
        "source_store": str(source.root.resolve()),
        "calculator": calculator_name if calculator is not None else None,
        "settings": as_dict(s),
    }
    check_recipe(dest, RECIPE_FILE, recipe, "perturb")
    done = set(dest.frame_ids())
    todo = [i for i in ids if not all(e in done for e in expected_ids(i, s))]
    if len(todo) < len(ids):
        log.info(
            "perturb: %d of %d parents already done in %s", len(ids) - len(todo), len(ids), out
        )
    calc = calculator
    n_parents = n_written = 0
    t0 = time.perf_counter()
    for k, frame in enumerate(source.iter_frames(todo), 1):
        if callable(calc) and not hasattr(calc, "get_property"):
            calc = calc()
        t1 = time.perf_counter()
        frames = make_perturbations([frame], s, prerelax_calc=calc, md_calc=calc)
        n_written += dest.add_frames(frames)
        n_parents += 1
        pre = frames[0].info.get("prerelax_steps") if frames else None
        log.info(
            "perturb %d/%d %s: %d frames%s in %.1f s (elapsed %.0f s)",
            k,
            len(todo),
            frame.frame_id,
            len(frames),
            "" if pre is None else f", pre-relaxed in {pre} steps",
            time.perf_counter() - t1,
            time.perf_counter() - t0,
        )
    return n_parents, n_written

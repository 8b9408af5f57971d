"""Generated molecular crystals: random packings relaxed by a teacher, trajectories as frames.

For every distinct molecule of pyxtal's shipped crystals (``test.db``, ``mech.db``; extracted
whole from the experimental cells with :mod:`kd_nnp.data.molecules`),
``packings`` random crystals are made with ``pyxtal.from_random`` (Z' = 1 by default, space
groups drawn by their frequency in organic crystals, :data:`SPACE_GROUP_TABLE`), checked
(density, molecules whole, not a duplicate of an earlier packing of the molecule), shrunk
molecule-rigidly toward ``start_density`` (pyxtal's packings are loose) and relaxed with the
given ASE calculator (cell + positions, ``FrechetCellFilter``, ``exp_cell_factor`` = atoms). Every
``keep_every``-th step and the final one become frames; the calculator's energy, forces and
stress on each are written as the label set ``label_name`` (no second labelling pass).

- Molecules: only single-component crystals (every molecule of the cell has the same graph)
  give a molecule; co-crystals, salts and solvates are skipped and counted. A molecule is
  identified by ``<formula>-<hash>``, the hash being networkx's Weisfeiler-Lehman hash of its
  bond graph with elements as node labels (the same molecule from two crystals is kept once).
- Frame ids ``gen:<molecule>/p<k>/s<step>``; group id = the molecule id (splits keep a
  molecule together); info: ``space_group``, ``spg_num``, ``Z``, ``packing``,
  ``packing_seed``, ``step``, ``final``, ``n_steps``, ``max_force``, ``residual_stress_gpa``, ``density`` (max |sigma|),
  ``molecule_source`` (the CSD code the molecule came from), ``mol_smi`` if known.
- Random numbers of packing k of molecule m come from ``(seed, sha256(m), k)``: the same seed
  gives the same crystals, independently of the other molecules.
- Duplicates: a new packing is compared with the earlier packings of the same molecule that
  passed the checks (made again from their seeds, in order, before any relaxation) with
  pymatgen's ``StructureMatcher`` (default tolerances): the verdict does not depend on
  workers, resumes, or on what the relaxation did to the earlier ones.
- Workers: packings are made here; relaxations run in ``workers`` processes (one thread
  each, :func:`kd_nnp.utils.parallel.run_tasks`), results are written here as they arrive.
- Resumable: the frames of one packing are written in one SQLite transaction, then their
  labels (one transaction), then a line in ``STORE/generate.jsonl``. A packing with frames in
  the store, or with a rejection line, is done; frames without labels (a kill between the two
  transactions) are labelled by a single point at the next start. ``kill -9`` loses at most the
  packing in progress.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.data.molecules import MOL_KEYS_INFO, graph_key, molecules_of_crystal, one_molecule
from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError, check_recipe, label_set_name
from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.utils.jsonl import append_jsonl, read_jsonl
from kd_nnp.utils.settings import as_dict
from kd_nnp.utils.shard import check_shard

log = logging.getLogger(__name__)

SOURCE = "generate"
RECIPE_FILE = "generate.json"
LOG_FILE = "generate.jsonl"
#: ids of the frames this verb writes: gen:<molecule>/p<packing>/s<step>
FRAME_ID = re.compile(r"^gen:(.+)/p(\d+)/s(\d+)$")

#: Space groups of organic crystals and their approximate frequency in the CSD (%, rounded;
#: Groom et al., Acta Cryst. B72 (2016) 171, and the CSD's space-group statistics): P21/c,
#: P-1, P212121, C2/c, P21, Pbca, Pna21, Cc, P1, C2.
SPACE_GROUP_TABLE: tuple[tuple[int, str, float], ...] = (
    (14, "P21/c", 34.0),
    (2, "P-1", 25.4),
    (19, "P212121", 7.4),
    (15, "C2/c", 7.3),
    (4, "P21", 5.3),
    (61, "Pbca", 3.3),
    (33, "Pna21", 1.4),
    (9, "Cc", 1.0),
    (1, "P1", 0.9),
    (5, "C2", 0.8),
)

ORGANIC = {"H", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I"}
# Atomic masses in g/mol -> density g/cm^3 from amu/A^3
_AMU_A3_TO_G_CM3 = 1.66053906660
_EV_A3_TO_GPA = 160.21766208


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class GenerateSettings:
    """How random crystals are generated and relaxed (one definition for the Python API, the
    ``kd-nnp data generate`` options and the recipe a store remembers)."""

    databases: tuple[str, ...] = field(
        default=("test", "mech", "collection"),
        metadata=_h("molecule sources: pyxtal's test.db, mech.db, molecules.json (collection)"),
    )
    smiles_csv: str = field(
        default="", metadata=_h("also the molecules of this CSV (column smiles; needs RDKit)")
    )
    max_molecule_atoms: int = field(default=60, metadata=_h("largest molecule kept (atoms)"))
    packings: int = field(default=4, metadata=_h("random packings tried per molecule"))
    space_groups: tuple[int, ...] = field(
        default=tuple(n for n, _, _ in SPACE_GROUP_TABLE),
        metadata=_h("space groups drawn from (numbers)"),
    )
    space_group_weights: tuple[float, ...] = field(
        default=tuple(w for _, _, w in SPACE_GROUP_TABLE),
        metadata=_h("their relative frequencies (CSD %, SPACE_GROUP_TABLE)"),
    )
    z_prime: int = field(default=1, metadata=_h("molecules per general position (Z')"))
    volume_factor: float = field(default=1.1, metadata=_h("pyxtal's volume factor"))
    start_density: float = field(
        default=1.2,
        metadata=_h(
            "loose packings are shrunk molecule-rigidly toward this density (g/cm^3; 0: off)"
        ),
    )
    density_range: tuple[float, float] = field(
        default=(0.3, 3.5),
        metadata=_h("accepted density of a new packing (g/cm^3; relaxation compresses it)"),
    )
    relaxed_density_range: tuple[float, float] = field(
        default=(0.7, 3.5), metadata=_h("accepted density after relaxation (g/cm^3)")
    )
    dedup: bool = field(default=True, metadata=_h("drop packings StructureMatcher finds equal"))
    optimizer: str = field(default="FIRE", metadata=_h("FIRE | LBFGS"))
    relax_steps: int = field(default=150, metadata=_h("relaxation step budget (cell + positions)"))
    cell_factor: float = field(
        default=0.0,
        metadata=_h(
            "FrechetCellFilter's exp_cell_factor (0: the number of atoms, ASE's default; "
            "1 lets the optimizer strain the cell by up to its maxstep per step)"
        ),
    )
    fmax: float = field(default=0.05, metadata=_h("relaxation force limit (eV/A)"))
    keep_every: int = field(default=10, metadata=_h("keep every k-th step (plus the final one)"))
    seed: int = field(default=0, metadata=_h("random seed (per packing: seed, molecule, k)"))

    def check(self) -> None:
        if len(self.space_groups) != len(self.space_group_weights) or not self.space_groups:
            raise SettingsError(
                f"space_groups {self.space_groups} and space_group_weights "
                f"{self.space_group_weights} must be non-empty lists of the same length"
            )
        bad = [g for g in self.space_groups if not 1 <= g <= 230]
        if bad:
            raise SettingsError(f"space_groups {bad} are not space-group numbers (1-230)")
        if any(w < 0 for w in self.space_group_weights) or sum(self.space_group_weights) <= 0:
            raise SettingsError("space_group_weights must be >= 0 with a positive sum")
        unknown = sorted(set(self.databases) - {"test", "mech", "collection"})
        if unknown or not (self.databases or self.smiles_csv):
            raise SettingsError(
                f"databases must be from test, mech, collection; got {self.databases}"
            )
        if self.optimizer not in ("FIRE", "LBFGS"):
            raise SettingsError(f"optimizer must be FIRE or LBFGS, not {self.optimizer!r}")
        for name in ("density_range", "relaxed_density_range"):
            rng = getattr(self, name)
            if len(rng) != 2 or not 0 < rng[0] < rng[1]:
                raise SettingsError(f"{name} {rng} must be LO,HI with 0 < LO < HI")
        for name in ("packings", "z_prime", "keep_every", "max_molecule_atoms"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.relax_steps < 0:
            raise SettingsError(f"relax_steps must be >= 0, got {self.relax_steps}")
        if self.cell_factor < 0:
            raise SettingsError(
                f"cell_factor must be >= 0 (0: number of atoms), got {self.cell_factor}"
            )


# ---------------------------------------------------------------- molecules
@dataclass
class Molecule:
    """One distinct molecule: id ``<formula>-<graph hash>``, symbols, Cartesian positions."""

    mol_id: str
    symbols: list[str]
    positions: np.ndarray
    source: str  # CSD code of the crystal it was taken from
    smiles: str | None = None


def pyxtal_molecules(
    settings: GenerateSettings,
    skipped: Counter | None = None,
) -> list[Molecule]:
    """Distinct molecules of the single-component crystals of pyxtal's databases (first
    occurrence kept; order: databases, then file order). ``skipped`` counts the crystals left
    out by cause."""
    mols, counts = _pyxtal_molecules(tuple(settings.databases), settings.max_molecule_atoms)
    if skipped is not None:
        skipped.update(dict(counts))
    return [
        Molecule(m.mol_id, list(m.symbols), m.positions.copy(), m.source, m.smiles) for m in mols
    ]


@functools.lru_cache(maxsize=4)
def _pyxtal_molecules(
    databases: tuple[str, ...], max_atoms: int
) -> tuple[tuple[Molecule, ...], tuple[tuple[str, int], ...]]:
    from kd_nnp.data.sources.pyxtal_db import checked_crystals

    skipped: Counter = Counter()
    seen: dict[str, Molecule] = {}

    def take(key: str, syms: list[str], pos: np.ndarray, code: str, smi: str | None) -> None:
        if not set(syms) <= ORGANIC or "C" not in syms:
            skipped["not organic"] += 1
        elif len(syms) > max_atoms:
            skipped["molecule too large"] += 1
        elif key in seen:
            skipped["molecule already taken"] += 1
        else:
            seen[key] = Molecule(key, syms, pos - pos.mean(axis=0), code, smi)

    for db in databases:
        if db == "collection":
            for name, syms, pos in _collection():
                if not one_molecule(syms, pos):
                    skipped["not one molecule"] += 1
                    continue
                take(graph_key(syms, pos), syms, pos, f"collection:{name}", None)
            continue
        bad: list[tuple[str, str]] = []
        for code, atoms in checked_crystals(db, skipped=bad):
            try:
                mols = molecules_of_crystal(atoms)
            except ValueError:
                skipped["not molecular"] += 1
                continue
            keys = {k for k, _, _ in mols}
            if len(keys) != 1:
                skipped["several kinds of molecule"] += 1
                continue
            key, syms, pos = mols[0]
            take(key, syms, pos, code, atoms.info.get("mol_smi"))
        skipped["failed sanity check"] += len(bad)
    return tuple(seen.values()), tuple(sorted(skipped.items()))


def _collection() -> list[tuple[str, list[str], np.ndarray]]:
    """pyxtal's ``database/molecules.json``: ``[(name, symbols, positions)]``."""
    import pyxtal

    path = os.path.join(os.path.dirname(pyxtal.__file__), "database", "molecules.json")
    with open(path) as fh:
        rows = json.load(fh)
    return [(str(r["name"]), list(r["elements"]), np.asarray(r["xyz"], dtype=float)) for r in rows]


def smiles_molecules(path: str) -> list[Molecule]:
    """Molecules of a CSV with a ``smiles`` column (optional ``name``): one 3D conformer
    each through pyxtal's RDKit route (ETKDG + MMFF/UFF). RDKit is optional: without it this
    stops with the command that installs it."""
    import csv

    if not os.path.isfile(path):
        raise SettingsError(f"smiles_csv {path}: no such file")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "smiles" not in rows[0]:
        raise SettingsError(f"{path}: needs a header with a 'smiles' column (and optional 'name')")
    import importlib.util

    # RDKit is optional (not a kd_nnp dependency): pyxtal imports it to build the conformers
    if importlib.util.find_spec("rdkit") is None:
        raise SettingsError(
            f"{path}: 3D conformers from SMILES need RDKit, which kd_nnp does not install; "
            "`pip install rdkit`, or leave smiles_csv empty to use pyxtal's molecules"
        )
    from pyxtal.molecule import pyxtal_molecule

    out = []
    for k, row in enumerate(rows, 2):
        smi = (row.get("smiles") or "").strip()
        name = (row.get("name") or "").strip() or f"row{k}"
        try:
            pm = pyxtal_molecule(smi + ".smi", seed=0, random_state=0)
        except Exception as exc:  # RDKit/pyxtal raise many kinds on a bad SMILES
            raise SettingsError(
                f"{path} line {k}: SMILES {smi!r} gave no conformer: {exc}"
            ) from exc
        syms = [str(s.specie) for s in pm.mol]
        pos = np.asarray(pm.mol.cart_coords, dtype=float)
        out.append(Molecule(graph_key(syms, pos), syms, pos - pos.mean(axis=0), name, smi))
    return out


# ---------------------------------------------------------------- packings
def _rng(seed: int, mol_id: str, k: int) -> np.random.Generator:
    h = int(hashlib.sha256(mol_id.encode()).hexdigest()[:12], 16)
    return np.random.default_rng([int(seed), h, int(k)])


def density(atoms: Atoms) -> float:
    """g/cm^3."""
    return float(atoms.get_masses().sum() / atoms.get_volume() * _AMU_A3_TO_G_CM3)


class Rejected(Exception):
    """A packing that is not kept; ``cause`` is one of the counted causes."""

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause


def check_whole(atoms: Atoms, mol: Molecule, n_expected: int) -> None:
    """Raise :class:`Rejected` unless ``atoms`` holds ``n_expected`` whole copies of ``mol``."""
    try:
        mols = molecules_of_crystal(atoms)
    except ValueError as exc:
        raise Rejected("molecules not whole", str(exc)) from None
    keys = Counter(k for k, _, _ in mols)
    if keys != Counter({mol.mol_id: n_expected}):
        raise Rejected(
            "molecules not whole",
            f"expected {n_expected} x {mol.mol_id}, found {dict(keys)}",
        )


def make_packing(
    mol: Molecule, k: int, settings: GenerateSettings, info: dict[str, Any] | None = None
) -> tuple[Atoms, dict[str, Any]]:
    """Packing ``k`` of ``mol``: a random crystal and its info (also filled into ``info``
    as soon as known), or :class:`Rejected`."""
    from pymatgen.core import Molecule as PmgMolecule
    from pyxtal import pyxtal
    from pyxtal.molecule import pyxtal_molecule
    from pyxtal.symmetry import Group

    s = settings
    rng = _rng(s.seed, mol.mol_id, k)
    w = np.asarray(s.space_group_weights, dtype=float)
    sg = int(rng.choice(np.asarray(s.space_groups), p=w / w.sum()))
    pseed = int(rng.integers(2**31 - 1))
    z = s.z_prime * Group(sg)[0].multiplicity
    info = info if info is not None else {}
    info.update(spg_num=sg, Z=z, packing=k, packing_seed=pseed)
    pm = pyxtal_molecule(PmgMolecule(mol.symbols, mol.positions), seed=pseed, random_state=pseed)
    crystal = pyxtal(molecular=True)
    try:
        crystal.from_random(
            3, sg, [pm], [z], factor=s.volume_factor, random_state=pseed, max_count=10
        )
    except Exception as exc:  # pyxtal raises bare RuntimeErrors/ValueErrors on failure
        raise Rejected("pyxtal failed", f"{type(exc).__name__}: {exc}") from None
    if not crystal.valid:
        raise Rejected("pyxtal failed", "no valid crystal within max_count")
    atoms = crystal.to_ase(resort=False)
    atoms.calc = None
    atoms.pbc = True
    info["space_group"] = str(crystal.group.symbol)
    rho = density(atoms)
    lo, hi = s.density_range
    if not lo <= rho <= hi:
        raise Rejected("density", f"{rho:.2f} g/cm^3 outside {lo}..{hi}")
    try:
        check_whole(atoms, mol, z)
    except Rejected as rej:
        raise Rejected("overlap in packing", str(rej)) from None
    info["density_pyxtal"] = rho
    atoms = compress(atoms, mol, z, s.start_density)
    info["density0"] = density(atoms)
    return atoms, info


def compress(atoms: Atoms, mol: Molecule, z: int, target: float) -> Atoms:
    """Shrink a loose packing molecule-rigidly (each molecule's centre follows the cell, its
    geometry is kept) toward density ``target``: the densest of 8 steps between the packing's
    density and ``target`` at which the molecules stay whole and apart (pyxtal's packings are
    loose, e.g. aspirin 0.63 g/cm^3 against 1.40 in experiment, and a teacher finds hardly any
    stress there to compress them). A packing already denser than ``target`` is kept."""
    from kd_nnp.data.sources.perturb import apply_strain

    rho0 = density(atoms)
    if target <= 0 or rho0 >= target:
        return atoms
    for rho in np.linspace(target, rho0, 8, endpoint=False):
        eps = ((rho0 / rho) ** (1 / 3) - 1) * np.eye(3)
        trial = apply_strain(atoms, eps, "molecular")
        try:
            check_whole(trial, mol, z)
        except Rejected:
            continue
        return trial
    return atoms


def _matcher() -> Any:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher()


def _structure(atoms: Atoms) -> Any:
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(atoms)


# ---------------------------------------------------------------- relaxation
def _record_old_cell_factor(path: Any) -> None:
    """A store recorded before ``cell_factor`` existed was relaxed with exp_cell_factor 1:
    its record says so from now on, so ``--cell-factor 1`` resumes it and the new default is
    refused as another recipe (instead of every setting being refused)."""
    if not path.is_file():
        return
    rec = json.loads(path.read_text())
    if "settings" in rec and "cell_factor" not in rec["settings"]:
        rec["settings"]["cell_factor"] = 1.0
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2))
        tmp.replace(path)


def relax_trajectory(
    atoms: Atoms, calc: Any, settings: GenerateSettings
) -> list[tuple[int, Atoms, Labels]]:
    """Relax cell + positions; ``[(step, atoms, labels)]`` for every ``keep_every``-th step
    and the final one (labels: the calculator's energy, forces, stress at that geometry)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE, LBFGS

    s = settings
    a = atoms.copy()
    a.calc = calc
    kept: list[tuple[int, Atoms, Labels]] = []
    state = {"step": 0}

    def snapshot() -> tuple[int, Atoms, Labels]:
        lab = Labels(a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=True))
        c = Atoms(a.numbers, a.positions, cell=a.cell, pbc=True)
        return state["step"], c, lab

    def observe() -> None:
        if state["step"] % s.keep_every == 0:
            kept.append(snapshot())
        state["step"] += 1

    opt_cls = FIRE if s.optimizer == "FIRE" else LBFGS
    # exp_cell_factor 1 (the old recipe) let FIRE's 0.2 maxstep act on the log-strain directly:
    # the cell blew up by 20-40 % in the first 10 steps (so3lr: benzene 1.20 -> 0.94 g/cm^3,
    # formamide 0.98 -> 0.65) and the weak long-range attraction never pulled it back.
    ecf = s.cell_factor or float(len(a))
    opt = opt_cls(FrechetCellFilter(a, exp_cell_factor=ecf), logfile=None)
    opt.attach(observe, interval=1)
    opt.run(fmax=s.fmax, steps=s.relax_steps)
    last = state["step"] - 1
    if not kept or kept[-1][0] != last:
        state["step"] = last
        kept.append(snapshot())
    return kept


def relax_packing(
    mol: Molecule, atoms: Atoms, info: dict[str, Any], settings: GenerateSettings, calc: Any
) -> dict[str, Any]:
    """Relax one packing and check it: ``{"status": "ok", "traj": [(step, atoms, labels,
    frame info)], "steps", "fmax", "residual_stress_gpa", "density", "seconds"}`` or
    ``{"status": "rejected", "cause", "detail", "seconds"}``."""
    t1 = time.perf_counter()
    try:
        try:
            traj = relax_trajectory(atoms, calc, settings)
        except Exception as exc:  # the teacher failed on this crystal
            raise Rejected("relaxation failed", f"{type(exc).__name__}: {exc}") from None
        final_step, final, flab = traj[-1]
        rho = density(final)
        lo, hi = settings.relaxed_density_range
        if not lo <= rho <= hi:
            raise Rejected("density after relaxation", f"{rho:.2f} g/cm^3 outside {lo}..{hi}")
        try:
            check_whole(final, mol, info["Z"])
        except Rejected as rej:
            raise Rejected("molecules broken in relaxation", str(rej)) from None
    except Rejected as rej:
        return dict(
            status="rejected",
            cause=rej.cause,
            detail=str(rej),
            seconds=time.perf_counter() - t1,
        )
    out = []
    for step, a, lab in traj:
        fi = dict(
            info,
            step=step,
            final=step == final_step,
            n_steps=final_step,
            max_force=float(np.linalg.norm(lab.forces, axis=1).max()),
            residual_stress_gpa=float(np.abs(lab.stress).max()) * _EV_A3_TO_GPA,
            density=density(a),
            molecule_source=mol.source,
        )
        out.append((step, a, lab, fi))
    return dict(
        status="ok",
        traj=out,
        steps=final_step,
        fmax=float(np.linalg.norm(flab.forces, axis=1).max()),
        residual_stress_gpa=float(np.abs(flab.stress).max()) * _EV_A3_TO_GPA,
        density=rho,
        seconds=time.perf_counter() - t1,
    )


_WORKER_CALC: Any = None


def _init_worker_calculator(builder: Any) -> None:
    global _WORKER_CALC
    _WORKER_CALC = builder()


def _relax_task(item: tuple[Molecule, Atoms, dict[str, Any], GenerateSettings]) -> dict[str, Any]:
    mol, atoms, info, settings = item
    return relax_packing(mol, atoms, info, settings, _WORKER_CALC)


# ---------------------------------------------------------------- store
def _packing_prefix(mol_id: str, k: int) -> str:
    return f"gen:{mol_id}/p{k}/"


@dataclass
class GenerateReport:
    """What one run did: packings done before, accepted, rejected by cause, frames, time."""

    n_molecules: int = 0
    done_before: int = 0
    accepted: int = 0
    frames: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped_crystals: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    relabelled: int = 0

    def summary(self) -> str:
        rate = self.accepted / self.seconds * 3600 if self.seconds > 0 else 0.0
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"{self.n_molecules} molecules; {self.accepted} crystals accepted "
            f"({self.frames} frames), {self.done_before} packings done before; "
            f"rejected: {rej}; {self.seconds:.0f} s ({rate:.1f} crystals/h)"
        )


def build_generate_store(
    out: str,
    settings: GenerateSettings | None = None,
    *,
    calculator: Any,
    calculator_name: str,
    provenance: dict[str, Any] | None = None,
    label_name: str | None = None,
    molecules: Iterable[str] | None = None,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> GenerateReport:
    """Generate, relax and store random crystals of pyxtal's molecules into store ``out``.

    ``calculator``: an ASE calculator or a zero-argument callable building one (called only
    when something is left to do); ``calculator_name`` names it in the recipe and, made
    file-safe, names the label set unless ``label_name`` is given; ``provenance`` (e.g. a
    teacher's ``provenance()``) is stored as the label set's metadata. ``molecules`` keeps
    only molecules whose id or source CSD code is listed; ``limit`` the first N molecules;
    ``shard=(k, n)`` then keeps molecules k, k+n, k+2n, ... (k = 0..n-1): n jobs of a cluster
    array, each writing its own store, together make every molecule once (``kd-nnp data merge``
    joins them).
    ``workers`` > 1 relax packings in that many processes (one thread each; ``calculator``
    must then be a picklable builder, called once per worker); the packings themselves are
    made and de-duplicated here, in order, so the result does not depend on ``workers``.
    A store keeps one recipe: a rerun with the same settings resumes, others are refused.
    """
    s = settings or GenerateSettings()
    s.check()
    if calculator is None:
        raise SettingsError("generate needs a calculator (the teacher that relaxes the crystals)")
    t0 = time.perf_counter()
    report = GenerateReport()
    mols = pyxtal_molecules(s, report.skipped_crystals)
    if s.smiles_csv:
        known_ids = {m.mol_id for m in mols}
        for m in smiles_molecules(s.smiles_csv):
            if m.mol_id in known_ids:
                report.skipped_crystals["molecule already taken"] += 1
            else:
                known_ids.add(m.mol_id)
                mols.append(m)
    if molecules is not None:
        wanted = set(molecules)
        mols = [m for m in mols if m.mol_id in wanted or m.source in wanted]
        known = {m.mol_id for m in mols} | {m.source for m in mols}
        missing = sorted(wanted - known)
        if missing:
            raise StoreError(
                f"no usable molecule for {missing} (give a CSD code of pyxtal's "
                f"{'/'.join(s.databases)}.db single-component crystals or a molecule id)"
            )
    if limit is not None:
        mols = mols[: int(limit)]
    if shard is not None:
        k, n = check_shard(*shard)
        mols = mols[k::n]
    report.n_molecules = len(mols)
    if not mols:
        raise StoreError(f"no molecule to generate crystals of ({dict(report.skipped_crystals)})")
    name = label_name or label_set_name(calculator_name)
    dest = FrameStore(out, create=True, description="generated molecular crystals")
    recipe = {"calculator": calculator_name, "label_set": name, "settings": as_dict(s)}
    if provenance and provenance.get("hash"):
        recipe["calculator_hash"] = provenance["hash"]
    _record_old_cell_factor(dest.root / RECIPE_FILE)
    check_recipe(dest, RECIPE_FILE, recipe, "generate")
    labels = dest.labels(name, create=True)
    with labels.writer_lock():
        labels.set_provenance(
            dict(provenance or {"name": calculator_name}, label_set=name, source=SOURCE)
        )
        calc = calculator
        log_path = dest.root / LOG_FILE
        done: dict[tuple[str, int], str] = {}
        for rec in read_jsonl(log_path):
            done[(rec["molecule"], int(rec["packing"]))] = rec["status"]
        # only this verb's frames (gen:<molecule>/p<k>/s<step>): `data molecules` may have
        # added gas-phase frames of the generated crystals to the same store and label set
        ids = [i for i in dest.frame_ids() if FRAME_ID.match(i)]
        for fid in ids:
            m = FRAME_ID.match(fid)
            done.setdefault((m.group(1), int(m.group(2))), "ok")
        # frames written but not labelled (killed between the two transactions)
        status = labels.status()
        unlabelled = [i for i in ids if status.get(i) != "ok"]
        if unlabelled:
            if callable(calc) and not hasattr(calc, "get_property"):
                calc = calc()
            results = []
            for fr in dest.iter_frames(unlabelled):
                t1 = time.perf_counter()
                a = fr.atoms.copy()
                a.calc = calc
                lab = Labels(a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=True))
                results.append((fr, lab, None, time.perf_counter() - t1))
            labels.write(results)
            report.relabelled = len(results)
            log.info("generate: labelled %d frames written before a kill", len(results))
        todo = {(m.mol_id, k) for m in mols for k in range(s.packings) if (m.mol_id, k) not in done}
        report.done_before = len(mols) * s.packings - len(todo)
        if report.done_before:
            log.info("generate: %d packings already done in %s", report.done_before, out)
        # 1. packings (cheap, here, in order: duplicates are judged against the earlier
        #    packings of the molecule that passed the checks, whatever happened to them later)
        jobs: list[tuple[Molecule, int, Atoms, dict[str, Any]]] = []
        matcher = _matcher() if s.dedup else None
        for mol in mols:
            if not any((mol.mol_id, k) in todo for k in range(s.packings)):
                continue
            earlier: list[Any] = []
            for k in range(s.packings):
                t1 = time.perf_counter()
                info: dict[str, Any] = {}
                try:
                    atoms, info = make_packing(mol, k, s, info)
                    if matcher is not None:
                        st = _structure(atoms)
                        if any(matcher.fit(st, other) for other in earlier):
                            raise Rejected("duplicate", "StructureMatcher: equal to an earlier one")
                        earlier.append(st)
                except Rejected as rej:
                    if (mol.mol_id, k) in todo:
                        rec = {"molecule": mol.mol_id, "packing": k}
                        rec.update({x: info[x] for x in ("spg_num", "packing_seed") if x in info})
                        rec.update(status="rejected", cause=rej.cause, detail=str(rej))
                        rec["seconds"] = round(time.perf_counter() - t1, 3)
                        report.rejected[rej.cause] += 1
                        append_jsonl(log_path, rec)
                        log.info("generate %s p%d: rejected (%s)", mol.mol_id, k, rej)
                    continue
                if (mol.mol_id, k) in todo:
                    jobs.append((mol, k, atoms, info))
        # 2. relaxations (in this process, or in workers); each result written as it arrives
        n_done = 0

        def write(mol: Molecule, k: int, info: dict[str, Any], res: dict[str, Any]) -> None:
            nonlocal n_done
            n_done += 1
            record: dict[str, Any] = {"molecule": mol.mol_id, "packing": k}
            record.update({x: info[x] for x in ("spg_num", "packing_seed")})
            if res["status"] == "ok":
                frames, results = [], []
                for step, a, lab, fi in res["traj"]:
                    if mol.smiles:
                        fi["mol_smi"] = mol.smiles
                    fi[MOL_KEYS_INFO] = mol.mol_id  # one kind of molecule: its graph key
                    fr = Frame(
                        f"{_packing_prefix(mol.mol_id, k)}s{step}", a, mol.mol_id, SOURCE, None, fi
                    )
                    frames.append(fr)
                    results.append((fr, lab, None, 0.0))
                dest.add_frames(frames, batch_size=len(frames) + 1)  # one transaction
                labels.write(results)
                record.update(
                    {x: res[x] for x in ("steps", "fmax", "residual_stress_gpa", "density")}
                )
                record.update(status="ok", frames=len(frames))
                report.accepted += 1
                report.frames += len(frames)
            else:
                record.update(status="rejected", cause=res["cause"], detail=res["detail"])
                report.rejected[res["cause"]] += 1
            record["seconds"] = round(res["seconds"], 3)
            append_jsonl(log_path, record)
            el = time.perf_counter() - t0
            log.info(
                "generate %d/%d %s p%d (sg %s): %s in %.1f s (%d accepted, %.1f crystals/h)",
                n_done,
                len(jobs),
                mol.mol_id,
                k,
                record.get("spg_num"),
                record["status"]
                + (
                    f", {record['frames']} frames, {record['steps']} steps"
                    if record["status"] == "ok"
                    else f" ({record['detail']})"
                ),
                record["seconds"],
                report.accepted,
                report.accepted / el * 3600 if el > 0 else 0.0,
            )

        if workers <= 1 or len(jobs) <= 1:
            for mol, k, atoms, info in jobs:
                if callable(calc) and not hasattr(calc, "get_property"):
                    calc = calc()
                write(mol, k, info, relax_packing(mol, atoms, info, s, calc))
        else:
            from kd_nnp.utils.parallel import run_tasks

            if not callable(calculator) or hasattr(calculator, "get_property"):
                raise SettingsError(
                    "workers > 1 need a calculator builder (a picklable zero-argument callable "
                    "each worker calls), not a calculator instance"
                )
            by_key = {(m.mol_id, k): (m, info) for m, k, _, info in jobs}
            items = [((m.mol_id, k), (m, a, info, s)) for m, k, a, info in jobs]
            for tr in run_tasks(
                _relax_task,
                items,
                n_workers=workers,
                initializer=_init_worker_calculator,
                initargs=(calculator,),
                desc="generate",
                progress=progress,
            ):
                mol, info = by_key[tr.key]
                if tr.ok:
                    write(mol, tr.key[1], info, tr.value)
                else:  # the task itself broke (not the teacher: relax_packing catches that)
                    raise KdNnpError(
                        f"generate {tr.key[0]} p{tr.key[1]}: worker failed: {tr.error}"
                    )
    report.seconds = time.perf_counter() - t0
    return report


def read_generate_log(store: str) -> list[dict[str, Any]]:
    """Every packing record of a generated store (``STORE/generate.jsonl``)."""
    return read_jsonl(FrameStore(store).root / LOG_FILE)

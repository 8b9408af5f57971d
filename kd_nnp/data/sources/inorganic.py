"""Built-in inorganic and hybrid crystals (offline, deterministic) and replay frames made of them.

Two uses, one definition of the structures:

- the forgetting check (:mod:`kd_nnp.evaluation.forgetting`) measures how far a student moved
  from pretrained CHGNet on them;
- ``kd-nnp data inorganic`` writes strained + rattled copies of them as *replay* frames into a
  store; labelled with pretrained CHGNet (``kd-nnp label store=STORE teacher=chgnet``) they are
  CHGNet's own soft labels on its pretraining domain (see docs/evaluation.md, "Replay").

:func:`builtin_structures`: 14 small crystals (at most 12 atoms) from ideal prototypes with
experimental-like lattice constants: Si, GaAs, NaCl, MgO, LiF, Cu, Al, Fe, ZnO (wurtzite),
rutile TiO2, cubic SrTiO3 and CsPbBr3 (``ase.build.bulk`` / ``ase.spacegroup.crystal``) and
two hybrids built by hand: pseudo-cubic methylammonium lead iodide and ordered ammonium
chloride. :func:`perturbed_copy`: a seeded strained + rattled supercell (>= 8 atoms, so that
forces are not fixed by symmetry).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
from ase import Atoms

from kd_nnp.data.store import Frame, FrameStore, StoreError, check_recipe

MIN_PERTURBED_ATOMS = 8
REPLAY_SOURCE = "replay-inorganic"
RECIPE_FILE = "replay_recipe.json"


def _perovskite(a_site: str, b_site: str, x_site: str, a: float) -> Atoms:
    from ase.spacegroup import crystal

    return crystal(
        [a_site, b_site, x_site],
        basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
        spacegroup=221,
        cellpar=[a, a, a, 90, 90, 90],
    )


def _methylammonium_lead_iodide(a: float = 6.33) -> Atoms:
    """Pseudo-cubic CH3NH3PbI3: PbI3 corner-sharing octahedra, the cation along x in the cage
    (C-N 1.47 A, C-H 1.09 A, N-H 1.03 A, tetrahedral angles, staggered), 12 atoms."""
    centre = np.array([0.5, 0.5, 0.5]) * a
    c_pos, n_pos = centre - [0.735, 0, 0], centre + [0.735, 0, 0]
    cos_t, sin_t = math.cos(math.radians(70.53)), math.sin(math.radians(70.53))
    hs = []
    for origin, sign, d, phase in ((c_pos, -1, 1.09, 0.0), (n_pos, 1, 1.03, 60.0)):
        for k in range(3):
            phi = math.radians(phase + 120.0 * k)
            hs.append(origin + d * np.array([sign * cos_t, sin_t * math.cos(phi),
                                             sin_t * math.sin(phi)]))  # fmt: skip
    pb = [0.0, 0.0, 0.0]
    iodide = [[a / 2, 0, 0], [0, a / 2, 0], [0, 0, a / 2]]
    return Atoms(
        "PbI3CNH6",
        positions=[pb, *iodide, c_pos, n_pos, *hs],
        cell=[a, a, a],
        pbc=True,
    )


def _ammonium_chloride(a: float = 3.87) -> Atoms:
    """Ordered (CsCl-type) NH4Cl, P-43m: N in the centre, N-H 1.03 A along the cube
    diagonals, 6 atoms."""
    n = np.array([0.5, 0.5, 0.5]) * a
    dirs = np.array([[1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]]) / math.sqrt(3.0)
    return Atoms("ClNH4", positions=[[0, 0, 0], n, *(n + 1.03 * dirs)], cell=[a] * 3, pbc=True)


def builtin_structures() -> dict[str, tuple[Atoms, str]]:
    """``{name: (atoms, group)}``: the unperturbed built-in set (group ``inorganic`` or
    ``hybrid``), experimental-like lattice constants, at most 12 atoms each."""
    from ase.build import bulk
    from ase.spacegroup import crystal

    out: dict[str, tuple[Atoms, str]] = {
        "Si": (bulk("Si", "diamond", a=5.43), "inorganic"),
        "GaAs": (bulk("GaAs", "zincblende", a=5.65), "inorganic"),
        "NaCl": (bulk("NaCl", "rocksalt", a=5.64), "inorganic"),
        "MgO": (bulk("MgO", "rocksalt", a=4.21), "inorganic"),
        "LiF": (bulk("LiF", "rocksalt", a=4.03), "inorganic"),
        "Cu": (bulk("Cu", "fcc", a=3.61), "inorganic"),
        "Al": (bulk("Al", "fcc", a=4.05), "inorganic"),
        "Fe": (bulk("Fe", "bcc", a=2.87), "inorganic"),
        "ZnO": (bulk("ZnO", "wurtzite", a=3.25, c=5.21), "inorganic"),
        "TiO2-rutile": (
            crystal(
                ["Ti", "O"],
                basis=[(0, 0, 0), (0.305, 0.305, 0)],
                spacegroup=136,
                cellpar=[4.594, 4.594, 2.959, 90, 90, 90],
            ),  # fmt: skip
            "inorganic",
        ),
        "SrTiO3": (_perovskite("Sr", "Ti", "O", 3.905), "inorganic"),
        "CsPbBr3": (_perovskite("Cs", "Pb", "Br", 5.87), "inorganic"),
        "MAPbI3": (_methylammonium_lead_iodide(), "hybrid"),
        "NH4Cl": (_ammonium_chloride(), "hybrid"),
    }
    for atoms, _ in out.values():
        atoms.pbc = True
    return out


def _supercell(atoms: Atoms, min_atoms: int = MIN_PERTURBED_ATOMS) -> Atoms:
    """Repeat the shortest cell vector until the cell has at least ``min_atoms`` atoms."""
    reps = [1, 1, 1]
    while len(atoms) * int(np.prod(reps)) < min_atoms:
        lengths = atoms.cell.lengths() * reps
        reps[int(np.argmin(lengths))] += 1
    return atoms.repeat(reps)


def perturbed_copy(
    atoms: Atoms, name: str, index: int, *, seed: int, strain: float, rattle_std: float
) -> Atoms:
    """A strained (symmetric strain, components uniform in +/- ``strain``) and rattled
    (Gaussian, ``rattle_std`` A) supercell; the same for the same (name, index, seed)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), index])
    a = _supercell(atoms)
    eps = rng.uniform(-strain, strain, (3, 3))
    eps = 0.5 * (eps + eps.T)
    a.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    a.positions += rng.normal(0.0, rattle_std, a.positions.shape)
    return a


def replay_frames(
    n_perturbed: int = 4,
    *,
    seed: int = 1,
    strain: float = 0.03,
    rattle_std: float = 0.05,
    prototypes: list[str] | tuple[str, ...] | None = None,
) -> list[Frame]:
    """Strained + rattled copies of the built-in structures as unlabelled frames (group id =
    structure name, frame id ``replay:<name>/<seed>-<i>``). The unperturbed structures are
    left out: the forgetting check relaxes them. Use another ``seed`` than the check's
    (default 0) so that no replay frame is a test frame."""
    built = builtin_structures()
    names = list(prototypes) if prototypes else list(built)
    unknown = [n for n in names if n not in built]
    if unknown:
        raise StoreError(f"unknown built-in structure(s) {unknown}; known: {sorted(built)}")
    if n_perturbed < 1:
        raise StoreError(f"n_perturbed={n_perturbed}: at least one replay frame per structure")
    frames = []
    for name in names:
        atoms, group = built[name]
        for i in range(n_perturbed):
            a = perturbed_copy(atoms, name, i, seed=seed, strain=strain, rattle_std=rattle_std)
            info = {"replay_group": group, "prototype": name, "seed": seed, "strain": strain,
                    "rattle_std": rattle_std}  # fmt: skip
            frames.append(Frame(f"replay:{name}/{seed}-{i}", a, name, REPLAY_SOURCE, None, info))
    return frames


def build_replay_store(
    out: str | Path,
    n_perturbed: int = 4,
    *,
    seed: int = 1,
    strain: float = 0.03,
    rattle_std: float = 0.05,
    prototypes: list[str] | tuple[str, ...] | None = None,
) -> int:
    """Write :func:`replay_frames` into the store ``out``: one recipe per store (a rerun with
    the same settings adds nothing, other settings are refused). Returns the frames written."""
    frames = replay_frames(n_perturbed, seed=seed, strain=strain, rattle_std=rattle_std,
                           prototypes=prototypes)  # fmt: skip
    store = FrameStore(out, create=True, description="kd-nnp replay: built-in inorganic/hybrid")
    recipe = {"source": REPLAY_SOURCE, "settings": {
        "n_perturbed": n_perturbed, "seed": seed, "strain": strain, "rattle_std": rattle_std,
        "prototypes": list(prototypes) if prototypes else None}}  # fmt: skip
    check_recipe(store, RECIPE_FILE, recipe, "inorganic")
    return store.add_frames(frames)

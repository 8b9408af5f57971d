"""Molecules of a crystal: the project's one covalent bond rule and molecule finder.

Bonds: two atoms are bonded when their distance is below ``mult * (r_cov(i) + r_cov(j))``
(ASE's covalent radii, ``mult`` = 1.2 by default). Molecules are the connected components of
the *periodic* bond graph, each unwrapped (translated by lattice vectors) so that it is whole;
a component bonded to its own periodic image (a polymer, a framework) is not a molecule and
raises ValueError. Every stage that needs molecules uses this module: perturbation
(molecule-rigid strains), generated crystals (molecule ids), molecular stress, the relaxation
checks (broken / merged molecules), RMSD15, isolated molecules and lattice energies.

Gas-phase molecules are placed in a cubic periodic box by :func:`isolate`; a box is isolated
for a calculator of cutoff ``rc`` when every atom is farther than ``rc`` from every atom of every
periodic image (:func:`image_clearance`): then no edge of a cutoff graph crosses the box, and a
message-passing model with that cutoff sees the molecule alone however many layers it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

#: default multiple of the summed covalent radii below which two atoms are bonded
BOND_MULT = 1.2


def bond_cutoffs(atoms: Atoms, mult: float = BOND_MULT) -> np.ndarray:
    """Per-atom bond cutoff radii: ``mult`` x covalent radius."""
    return covalent_radii[atoms.numbers] * mult


def bond_list(atoms: Atoms, mult: float = BOND_MULT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Periodic covalent bonds ``(i, j, shift)`` with ``i < j`` or ``i == j`` across cells."""
    i, j, s = neighbor_list("ijS", atoms, bond_cutoffs(atoms, mult), self_interaction=False)
    keep = (i < j) | ((i == j) & _lex_positive(s))
    return i[keep], j[keep], s[keep]


def _lex_positive(s: np.ndarray) -> np.ndarray:
    """Rows of integer shifts whose first non-zero entry is positive (keeps one direction
    of a bond from an atom to its own periodic image)."""
    out = np.zeros(len(s), dtype=bool)
    for k, row in enumerate(s):
        nz = row[row != 0]
        out[k] = bool(len(nz)) and nz[0] > 0
    return out


def bond_set(atoms: Atoms, mult: float = BOND_MULT) -> set[tuple[int, int, int, int, int]]:
    """Bonds as a set of ``(i, j, s1, s2, s3)`` with ``i <= j``, comparable between the
    structures of one crystal before and after relaxation (same atom order)."""
    i, j, s = bond_list(atoms, mult)
    return {(int(a), int(b), *map(int, sh)) for a, b, sh in zip(i, j, s)}


def molecules(atoms: Atoms, mult: float = BOND_MULT) -> tuple[list[np.ndarray], np.ndarray]:
    """Molecules (connected components of the periodic bond graph), each unwrapped.

    Returns ``(index_lists, unwrapped_positions)``: ``unwrapped_positions[k]`` is atom ``k``
    translated by lattice vectors so that every molecule is whole. A molecule bonded to its
    own image (a polymer) cannot be unwrapped: ValueError.
    """
    n = len(atoms)
    i, j, s = neighbor_list("ijS", atoms, bond_cutoffs(atoms, mult), self_interaction=False)
    adj: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    for a, b, sh in zip(i, j, s):
        adj[a].append((int(b), sh))
    offset = np.zeros((n, 3), dtype=int)
    seen = np.zeros(n, dtype=bool)
    groups: list[np.ndarray] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        stack = [start]
        members = [start]
        while stack:
            a = stack.pop()
            for b, sh in adj[a]:
                want = offset[a] + sh
                if not seen[b]:
                    seen[b] = True
                    offset[b] = want
                    stack.append(b)
                    members.append(b)
                elif not np.array_equal(offset[b], want):
                    raise ValueError(
                        f"atoms {a} and {b} form an infinite (periodic) network, not molecules"
                    )
        groups.append(np.array(sorted(members)))
    unwrapped = atoms.positions + offset @ atoms.cell.array
    return groups, unwrapped


def molecule_labels(atoms: Atoms, mult: float = BOND_MULT) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom molecule label (0, 1, ... in order of first atom) and unwrapped positions."""
    groups, unwrapped = molecules(atoms, mult)
    labels = np.empty(len(atoms), dtype=int)
    for m, idx in enumerate(groups):
        labels[idx] = m
    return labels, unwrapped


def molecule_centres(atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Molecule labels, unwrapped positions and, per atom, the geometric centre of its
    molecule (N, 3): the centre that molecule-rigid strains keep fixed relative to the cell
    (perturbations and the molecular stress of :mod:`kd_nnp.training.stress`)."""
    labels, pos = molecule_labels(atoms)
    centres = np.empty_like(pos)
    for m in np.unique(labels):
        sel = labels == m
        centres[sel] = pos[sel].mean(axis=0)
    return labels, pos, centres


def graph_key(symbols: Sequence[str], positions: np.ndarray, mult: float = BOND_MULT) -> str:
    """Molecule id: Hill formula + Weisfeiler-Lehman hash of the bond graph with elements as
    node labels (the same molecule from two crystals, or two conformers, has one key)."""
    import networkx as nx

    a = Atoms(symbols, positions)
    i, j = neighbor_list("ij", a, bond_cutoffs(a, mult))
    g = nx.Graph()
    g.add_nodes_from((k, {"el": s}) for k, s in enumerate(symbols))
    g.add_edges_from((int(x), int(y)) for x, y in zip(i, j) if x < y)
    wl = nx.weisfeiler_lehman_graph_hash(g, node_attr="el", iterations=4, digest_size=6)
    return f"{a.get_chemical_formula(mode='hill')}-{wl}"


def molecules_of_crystal(atoms: Atoms) -> list[tuple[str, list[str], np.ndarray]]:
    """``[(key, symbols, unwrapped positions)]`` of each molecule of a crystal."""
    groups, pos = molecules(atoms)
    syms = atoms.get_chemical_symbols()
    out = []
    for idx in groups:
        s = [syms[i] for i in idx]
        out.append((graph_key(s, pos[idx]), s, pos[idx]))
    return out


def one_molecule(symbols: Sequence[str], positions: np.ndarray) -> bool:
    """Whether a gas-phase geometry is one bonded molecule (the crystals' bond rule)."""
    a = Atoms(list(symbols), positions - positions.mean(axis=0) + 25.0, cell=[50.0] * 3, pbc=True)
    try:
        groups, _ = molecules(a)
    except ValueError:
        return False
    return len(groups) == 1


@dataclass
class CrystalMolecule:
    """One kind of molecule of a crystal: ``key`` (:func:`graph_key`), ``count`` (molecules
    of this kind in the cell), the atom indices of its first occurrence and that molecule's
    symbols and unwrapped Cartesian positions (taken whole from the crystal)."""

    key: str
    count: int
    indices: np.ndarray
    symbols: list[str]
    positions: np.ndarray


def distinct_molecules(atoms: Atoms) -> list[CrystalMolecule]:
    """The distinct kinds of molecule of a crystal (by bond graph), in order of first atom.

    Sum over kinds of ``count x len(symbols)`` equals ``len(atoms)``; for a one-component
    crystal there is one kind and ``count`` = Z (molecules per cell). Molecules of one kind in
    different conformations (Z' > 1) share a kind: the first one's geometry is returned."""
    groups, pos = molecules(atoms)
    syms = atoms.get_chemical_symbols()
    kinds: dict[str, CrystalMolecule] = {}
    for idx in groups:
        s = [syms[i] for i in idx]
        key = graph_key(s, pos[idx])
        if key in kinds:
            kinds[key].count += 1
        else:
            kinds[key] = CrystalMolecule(key, 1, idx, s, pos[idx].copy())
    return list(kinds.values())


def image_clearance(atoms: Atoms) -> float:
    """Shortest distance between an atom and any atom of a periodic image of the cell
    (``inf`` without periodic directions). Exact for any cell: images are searched by
    ``neighbor_list`` up to the cell's largest diagonal."""
    if not atoms.pbc.any():
        return float("inf")
    reach = float(np.linalg.norm(atoms.cell.array.sum(axis=0))) + 2.0 * float(
        np.ptp(atoms.positions, axis=0).max()
    )
    reach = max(reach, 1.0)
    i, j, s, d = neighbor_list("ijSd", atoms, reach, self_interaction=False)
    image = np.any(s != 0, axis=1)
    return float(d[image].min()) if image.any() else float("inf")


def isolate(symbols: Sequence[str], positions: np.ndarray, clearance: float) -> Atoms:
    """A molecule centred in a cubic periodic box whose edge is its largest extent plus
    ``clearance`` (so every atom is at least ``clearance`` from every image atom).
    Raises ValueError when the geometry is not one molecule."""
    pos = np.asarray(positions, dtype=float)
    if not one_molecule(symbols, pos):
        raise ValueError("isolate: the geometry is not one bonded molecule")
    if clearance <= 0:
        raise ValueError(f"isolate: clearance must be > 0, got {clearance}")
    centred = pos - (pos.max(axis=0) + pos.min(axis=0)) / 2.0
    # an image shifted by L along x is at least L - (x extent) away from every atom
    edge = float(np.ptp(centred, axis=0).max()) + clearance
    out = Atoms(list(symbols), centred + edge / 2.0, cell=[edge] * 3, pbc=True)
    assert image_clearance(out) >= clearance - 1e-9
    return out


def connectivity_change(before: Atoms, after: Atoms, mult: float = BOND_MULT) -> dict:
    """Compare covalent bond graphs of one crystal before and after relaxation.

    ``broken``: bonds of ``before`` missing in ``after``; ``formed``: new bonds. A molecule
    is *broken* when its count grows or a bond disappears; *merged* when new bonds appear
    (between molecules or within). Returns counts and flags."""
    if len(before) != len(after) or (before.numbers != after.numbers).any():
        raise ValueError("connectivity_change needs the same atoms in the same order")
    b0, b1 = bond_set(before, mult), bond_set(after, mult)
    g0 = _n_components(len(before), b0)
    g1 = _n_components(len(after), b1)
    broken, formed = len(b0 - b1), len(b1 - b0)
    return {
        "n_molecules_before": g0,
        "n_molecules_after": g1,
        "bonds_broken": broken,
        "bonds_formed": formed,
        "molecule_broken": bool(g1 > g0 or broken > 0),
        "molecule_merged": bool(g1 < g0 or formed > 0),
    }


def _n_components(n: int, bonds: set[tuple[int, int, int, int, int]]) -> int:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, *_ in bonds:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    return len({find(x) for x in range(n)})


def isolated_stress(positions: np.ndarray, forces: np.ndarray, volume: float) -> np.ndarray:
    """Stress (ASE Voigt, eV/A^3) of an isolated molecule in a box of ``volume``: the
    derivative of its energy along a homogeneous strain of box and positions,
    ``sigma = -(1/V) sym(sum_i F_i (x) r_i)``. It equals a periodic calculator's stress in a box
    whose images do not interact (gas-phase frames labelled without periodicity; tested)."""
    r = np.asarray(positions, dtype=float)
    f = np.asarray(forces, dtype=float)
    full = -(f.T @ (r - r.mean(axis=0))) / float(volume)
    full = 0.5 * (full + full.T)
    return full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


#: frame ``info`` key holding a crystal's molecule keys (sorted graph keys joined by ``;``)
MOL_KEYS_INFO = "mol_keys"


def molecule_keys(atoms: Atoms) -> list[str]:
    """Sorted graph keys (:func:`graph_key`) of the kinds of molecule of a crystal."""
    return sorted(m.key for m in distinct_molecules(atoms))


def frame_molecule_keys(atoms: Atoms, info: dict | None = None) -> set[str]:
    """The molecule keys of a frame: its recorded ``info["mol_keys"]`` when the source wrote
    them (:data:`MOL_KEYS_INFO`), else computed from the atoms. A structure without whole
    molecules (a covalent network) has the empty set."""
    rec = (info or {}).get(MOL_KEYS_INFO)
    if rec:
        return set(str(rec).split(";"))
    try:
        return set(molecule_keys(atoms))
    except ValueError:
        return set()


def read_molecule_keys(spec: str | Sequence[str]) -> list[str]:
    """Molecule keys from a list, a JSON file (a list of keys, or an object with a
    ``molecules`` list) or a text file (one key a line; ``#`` comments); sorted, unique.
    Raises :class:`~kd_nnp.errors.KdNnpError` naming the file and what is wrong."""
    import json
    from pathlib import Path

    from kd_nnp.errors import KdNnpError

    if not isinstance(spec, str):
        keys = [str(k) for k in spec]
    else:
        path = Path(spec)
        if not path.is_file():
            raise KdNnpError(f"molecule list {path}: no such file")
        text = path.read_text()
        if path.suffix == ".json":
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise KdNnpError(f"molecule list {path}: not JSON ({exc})") from None
            obj = obj.get("molecules") if isinstance(obj, dict) else obj
            if not isinstance(obj, list) or not all(isinstance(k, str) for k in obj):
                raise KdNnpError(
                    f"molecule list {path}: expected a list of molecule keys (strings) or "
                    '{"molecules": [...]}'
                )
            keys = obj
        else:
            keys = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    bad = [k for k in keys if k and (";" in k or k != k.strip())]
    if bad:
        raise KdNnpError(f"molecule list {spec}: malformed key {bad[0]!r}")
    return sorted({k for k in keys if k})

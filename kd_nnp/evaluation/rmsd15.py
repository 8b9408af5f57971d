"""RMSD15: an open implementation of the COMPACK-style crystal packing comparison
(Chisholm & Motherwell, J. Appl. Cryst. 2005, 38, 228).

Algorithm (both structures are periodic ASE Atoms):

1. Molecules are the connected components of the periodic covalent bond graph
   (1.2 x covalent radii), unwrapped; molecule *types* are told apart by the heavy-atom
   graph (Weisfeiler-Lehman hash with element labels).
2. Reference cluster: the central molecule (the first molecule with the most heavy atoms)
   and its ``n - 1`` nearest periodic copies by heavy-atom centroid distance (``n = 15``).
3. Candidate centres in the other structure: every molecule of the same type, with every
   element-preserving isomorphism of the heavy-atom graph onto the reference centre
   (``assume_same_order`` uses the same molecule index and the identity mapping instead).
   For each candidate the other structure's ``2n`` nearest copies are superposed on the
   reference with the transform (Kabsch) that overlays the two centres.
4. Molecule matching: per type, a one-to-one assignment (Hungarian) of reference molecules
   to other molecules by centroid distance; a pair matches when its distance is below
   ``1 A + 0.2 x`` (distance of the reference molecule from the centre), in the spirit of
   COMPACK's 20 % distance tolerance. Atoms within a matched pair are mapped by the graph
   isomorphism that places them closest. The superposition is then refined on all matched
   heavy atoms (Kabsch) and matching repeated, twice.
5. RMSD over the heavy (non-H) atoms of the matched molecules; the result also says how
   many of the ``n`` molecules matched. The best candidate (most matched, then lowest
   RMSD) is reported. Mirror images are not superposed (proper rotations only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from ase import Atoms
from networkx.algorithms.isomorphism import GraphMatcher
from scipy.optimize import linear_sum_assignment

from kd_nnp.data.molecules import molecules

MAX_ISOMORPHISMS = 240


@dataclass
class RMSD15Result:
    """Outcome of one comparison; ``ref_coords``/``other_coords`` are the matched heavy
    atoms (other superposed onto the reference), in matching order."""

    rmsd: float
    n_matched: int
    n_cluster: int
    ref_coords: np.ndarray = field(repr=False)
    other_coords: np.ndarray = field(repr=False)


@dataclass
class _Mol:
    heavy: np.ndarray  # heavy-atom indices into the structure
    coords: np.ndarray  # unwrapped heavy-atom coordinates (n_heavy, 3)
    centroid: np.ndarray
    graph: nx.Graph
    key: str


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R`` and translation ``t`` minimising ``|mobile @ R.T + t - target|``
    (proper rotation, det R = +1)."""
    pm, pt = mobile.mean(axis=0), target.mean(axis=0)
    h = (mobile - pm).T @ (target - pt)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, pt - pm @ rot.T


def _rmsd(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(axis=1).mean()))


def _molecules(atoms: Atoms) -> list[_Mol]:
    groups, unwrapped = molecules(atoms)
    numbers = atoms.numbers
    i, j = _bonded_pairs(atoms)
    out = []
    for grp in groups:
        heavy = np.array([k for k in grp if numbers[k] != 1], dtype=int)
        if len(heavy) == 0:
            continue
        local = {int(k): n for n, k in enumerate(heavy)}
        g = nx.Graph()
        for n, k in enumerate(heavy):
            g.add_node(n, Z=int(numbers[k]))
        for a, b in zip(i, j):
            if a in local and b in local and a < b:
                g.add_edge(local[a], local[b])
        key = nx.weisfeiler_lehman_graph_hash(g, node_attr="Z") + f"/{len(heavy)}"
        coords = unwrapped[heavy]
        out.append(_Mol(heavy, coords, coords.mean(axis=0), g, key))
    if not out:
        raise ValueError("no molecules with heavy atoms found")
    return out


def _bonded_pairs(atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
    from ase.neighborlist import neighbor_list

    from kd_nnp.data.molecules import bond_cutoffs

    i, j = neighbor_list("ij", atoms, bond_cutoffs(atoms))
    return i, j


def _copies(
    atoms: Atoms, mols: list[_Mol], center: np.ndarray, n: int
) -> list[tuple[int, np.ndarray, float]]:
    """The ``n`` periodic molecule copies nearest to ``center``: (mol index, shift, dist)."""
    cell = atoms.cell.array
    vol = abs(np.linalg.det(cell))
    heights = vol / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    radius = max(float(np.linalg.norm(m.coords - m.centroid, axis=1).max()) for m in mols)
    r_need = (3.0 * n * vol / (4.0 * math.pi * len(mols))) ** (1.0 / 3.0) * 1.6 + 2 * radius
    while True:
        reps = [int(math.ceil(r_need / h)) + 1 for h in heights]
        grid = np.stack(
            np.meshgrid(*[np.arange(-r, r + 1) for r in reps], indexing="ij"), -1
        ).reshape(-1, 3)
        shifts = grid @ cell
        cands = []
        for k, m in enumerate(mols):
            d = np.linalg.norm(m.centroid + shifts - center, axis=1)
            cands += [(k, shifts[s], float(d[s])) for s in np.argsort(d)[:n]]
        cands.sort(key=lambda c: c[2])
        chosen = cands[:n]
        # every copy within chosen[-1] distance must lie inside the enumerated block
        covered = min(r * h for r, h in zip(reps, heights)) - 2 * radius
        if len(chosen) == n and chosen[-1][2] <= covered:
            return chosen
        r_need *= 1.5


def _isomorphisms(a: _Mol, b: _Mol) -> list[np.ndarray]:
    """Element-preserving mappings of a's heavy atoms onto b's (perm[k] = index in b)."""
    if a.key != b.key:
        return []
    gm = GraphMatcher(b.graph, a.graph, node_match=lambda x, y: x["Z"] == y["Z"])
    maps = []
    for iso in gm.isomorphisms_iter():  # iso: b-node -> a-node
        perm = np.empty(len(a.heavy), dtype=int)
        for bn, an in iso.items():
            perm[an] = bn
        maps.append(perm)
        if len(maps) >= MAX_ISOMORPHISMS:
            break
    return maps


def rmsd15(
    ref: Atoms,
    other: Atoms,
    n_molecules: int = 15,
    *,
    assume_same_order: bool = False,
    max_centre_candidates: int = 24,
) -> RMSD15Result:
    """COMPACK-style RMSD of a ``n_molecules`` cluster between two crystal structures."""
    rm, om = _molecules(ref), _molecules(other)
    c_ref = max(range(len(rm)), key=lambda k: (len(rm[k].heavy), -k))
    ref_cluster = _copies(ref, rm, rm[c_ref].centroid, n_molecules)
    iso_cache: dict[tuple[int, int], list[np.ndarray]] = {}

    def isos(a: int, b: int) -> list[np.ndarray]:
        if (a, b) not in iso_cache:
            iso_cache[(a, b)] = _isomorphisms(rm[a], om[b])
        return iso_cache[(a, b)]

    # candidate centres (molecule index in other, atom mapping)
    cands: list[tuple[float, int, np.ndarray]] = []
    if assume_same_order:
        if len(rm) != len(om) or not np.array_equal(rm[c_ref].heavy, om[c_ref].heavy):
            raise ValueError("assume_same_order: molecules of the two structures differ")
        ident = np.arange(len(rm[c_ref].heavy))
        cands.append((0.0, c_ref, ident))
    else:
        for k in range(len(om)):
            for perm in isos(c_ref, k):
                rot, t = kabsch(om[k].coords[perm], rm[c_ref].coords)
                r = _rmsd(om[k].coords[perm] @ rot.T + t, rm[c_ref].coords)
                cands.append((r, k, perm))
        if not cands:
            raise ValueError("the central molecule of the reference has no match in other")
        cands.sort(key=lambda c: c[0])
        best = cands[0][0]
        cands = [c for c in cands if c[0] <= best + 0.5][:max_centre_candidates]

    ref_xyz = [(rm[k].coords + s, k, d) for k, s, d in ref_cluster]
    best_res: RMSD15Result | None = None
    for _, k, perm in cands:
        rot, t = kabsch(om[k].coords[perm], rm[c_ref].coords)
        oth = _copies(other, om, om[k].centroid, 2 * n_molecules)
        oth_xyz = [(om[m].coords + s, m) for m, s, _ in oth]
        res = None
        for _ in range(3):
            pairs = _match(ref_xyz, oth_xyz, rot, t, isos)
            if not pairs:
                break
            p = np.concatenate([o for _, o in pairs])
            q = np.concatenate([r for r, _ in pairs])
            rot, t = kabsch(p, q)
            res = RMSD15Result(_rmsd(p @ rot.T + t, q), len(pairs), n_molecules, q, p @ rot.T + t)
        if res is None:
            continue
        if best_res is None or (res.n_matched, -res.rmsd) > (best_res.n_matched, -best_res.rmsd):
            best_res = res
    if best_res is None:
        raise ValueError("no molecules could be matched")
    return best_res


def _match(
    ref_xyz: list[tuple[np.ndarray, int, float]],
    oth_xyz: list[tuple[np.ndarray, int]],
    rot: np.ndarray,
    t: np.ndarray,
    isos: Callable[[int, int], list[np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Assign reference cluster molecules to transformed other molecules (per type)."""
    moved = [(x @ rot.T + t, m) for x, m in oth_xyz]
    # pairs hold the *untransformed* other coordinates, so the caller can refit
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    r_cent = np.array([x.mean(axis=0) for x, _, _ in ref_xyz])
    o_cent = np.array([x.mean(axis=0) for x, _ in moved])
    cost = np.linalg.norm(r_cent[:, None] - o_cent[None], axis=2)
    # forbid pairs of molecules of different type (no isomorphism)
    compat = np.array([[len(isos(rk, om_)) > 0 for _, om_ in moved] for _, rk, _ in ref_xyz])
    big = 1e6
    cost = np.where(compat, cost, big)
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows, cols):
        x_ref, rk, dist = ref_xyz[r]
        tol = 1.0 + 0.2 * dist
        if cost[r, c] >= tol:
            continue
        x_oth, om_ = moved[c]
        best = min(isos(rk, om_), key=lambda p: ((x_oth[p] - x_ref) ** 2).sum())
        pairs.append((x_ref, oth_xyz[c][0][best]))
    return pairs

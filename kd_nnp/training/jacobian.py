"""Exact frozen-backbone training from cached CHGNet features (issue 6).

With ``mlp_first=True`` (CHGNet 0.3.0) the total energy of a frame is

    E = sum_i mlp(readout_norm(h_i)) + E_atomref(composition)

where ``h_i`` are the atom features after the last atom-convolution layer. When only
``model.mlp`` (and possibly ``readout_norm``) trains, ``h`` depends on the structure alone,
so for each frame we cache once

- ``h``           (N, 64)          atom features,
- ``jac_pos``     (N, 64, N, 3)    dh/dR, R the Cartesian positions at fixed lattice,
- ``jac_strain``  (N, 64, 3, 3)    dh/d(strain), lattice -> lattice @ (1 + strain),

and obtain, for any MLP/LayerNorm, by the chain rule

    F = -einsum("iakl,ia->kl", jac_pos, dE/dh)
    sigma = einsum("iakl,ia->kl", jac_strain, dE/dh) / V * 160.21766208   (GPa)

which is exactly what chgnet's autograd through the whole network computes, and
differentiable with respect to the MLP/LayerNorm parameters (``dE/dh`` is taken with
``create_graph=True``). The derivative conventions are those of
``chgnet.model.model.BatchedGraph.from_graphs``: forces are derivatives with respect to the
Cartesian positions ``frac @ lattice`` holding the lattice fixed, stress is the total
derivative with respect to the strain (positions move with the lattice).

The Jacobians are built with forward-mode AD (``torch.func.jvp`` vectorised by
``torch.func.vmap`` over chunks of the 3N + 9 input directions) through
:func:`kd_nnp.training.backbone.make_features_fn`, a functional re-implementation of ``CHGNet._compute`` up to the
last convolution for ONE graph with its neighbour lists held fixed (exact for derivatives:
chgnet's own neighbour list is fixed during its autograd as well). It calls the model's own
sub-modules; only the few in-place operations of chgnet (``aggregate``, ``Fourier``, the
residual ``+=``) are rewritten out of place so that ``vmap`` can batch them.
See docs/performance.md for measured build/step times and the memory rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor

from kd_nnp.training.backbone import FEATURE_DIM, check_model, make_features_fn
from kd_nnp.training.stress import VOIGT_PAIRS
from kd_nnp.training.tangent import Unsupported, features_jvp

DEFAULT_CHUNK_SIZE = 18  # directions per forward-mode pass (M = 4 + strain: one pass)


@dataclass
class FrameFeatures:
    """Cached frozen-backbone quantities of one frame (float32; memory-mapped when loaded)."""

    h: Tensor  # (N, 64) atom features before readout_norm
    jac_pos: Tensor | None  # (N, 64, M, 3) dh/dR_j for the M force atoms j (all: M = N)
    jac_strain: Tensor | None  # (N, 64, 3, 3) dh/dstrain
    atomref_energy: float  # total eV of model.composition_model
    volume: float  # A^3
    n_atoms: int
    # (M,) sorted atom indices whose position derivatives jac_pos holds; None = all atoms
    force_index: Tensor | None = None


def _atomref_energy(model: CHGNet, graph: CrystalGraph) -> float:
    """Total AtomRef energy (eV) exactly as chgnet adds it (per atom if intensive) x N."""
    with torch.no_grad():
        comp = float(model.composition_model([graph])[0])
    n = int(graph.atomic_number.shape[0])
    return comp * n if model.is_intensive else comp


def _volume(graph: CrystalGraph) -> float:
    lat = graph.lattice.detach()
    return float(torch.dot(lat[0], torch.linalg.cross(lat[1], lat[2])))


# the 6 symmetric strain directions (xx, yy, zz, yz, xz, xy); CHGNet's features are
# invariant under rotations, so dh/d(strain) has no antisymmetric part and the full 3x3
# Jacobian is J[a,b] = J[b,a] = derivative along (e_a e_b^T + e_b e_a^T) / 2
_SYM_STRAIN = VOIGT_PAIRS


def _strain_tangents(dtype: torch.dtype) -> Tensor:
    t = torch.zeros(len(_SYM_STRAIN), 3, 3, dtype=dtype)
    for k, (a, b) in enumerate(_SYM_STRAIN):
        t[k, a, b] += 0.5
        t[k, b, a] += 0.5
    return t


def _strain_jacobian(cols: Tensor) -> Tensor:
    """(N, 64, 6) derivatives along :data:`_SYM_STRAIN` -> (N, 64, 3, 3)."""
    jac = cols.new_zeros((*cols.shape[:2], 3, 3))
    for k, (a, b) in enumerate(_SYM_STRAIN):
        jac[..., a, b] = cols[..., k]
        jac[..., b, a] = cols[..., k]
    return jac


def select_force_atoms(numbers: Sequence[int] | np.ndarray, m: int | None, key: str,
                       seed: int = 0) -> np.ndarray | None:  # fmt: skip
    """The ``m`` atoms of a frame whose force Jacobian columns are cached (sorted indices).

    Reproducible from ``(key, seed)`` alone (``key``: the frame's content hash, so every job
    and every store that holds the same frame picks the same atoms and shares the cache).
    Stratified by species: a seeded random order of the atoms is re-sorted round-robin over
    the elements (the 1st atom of each element, then the 2nd, ...), so a frame's rare
    elements (S, Cl, N) are not drowned by its H atoms. ``m=None`` or ``m >= N``: None (all).
    """
    numbers = np.asarray(numbers)
    n = len(numbers)
    if m is None or int(m) >= n:
        return None
    if int(m) < 1:
        raise ValueError(f"force_atoms must be >= 1 or null (all atoms), got {m}")
    digest = hashlib.sha256(f"kd_nnp-force-atoms|{key}|{int(seed)}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    perm = rng.permutation(n)
    seen: dict[int, int] = {}
    ranked = []
    for pos, i in enumerate(perm):
        z = int(numbers[i])
        rank = seen.get(z, 0)
        seen[z] = rank + 1
        ranked.append((rank, pos, int(i)))
    ranked.sort()
    return np.sort(np.array([i for _, _, i in ranked[: int(m)]], dtype=np.int64))


def compute_features(
    model: CHGNet,
    graph: CrystalGraph,
    *,
    forces: bool = True,
    stress: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    method: str = "auto",
    force_atoms: Sequence[int] | np.ndarray | Tensor | None = None,
    strain_offsets: np.ndarray | Tensor | None = None,
) -> FrameFeatures:
    """Features and (optionally) their Jacobians of one frame, by forward-mode AD.

    ``strain_offsets`` (N, 3): each atom's position relative to its molecule's centre
    (unwrapped, :func:`molecule_offsets`). Given, the strain directions are *molecule-rigid*:
    the cell and the molecular centres follow the strain, every molecule keeps its shape
    (displacement ``-offset @ strain`` on top of the affine one), so the "stress" is the
    molecular (intermolecular) stress ``sigma + offsets^T F / V``, free of the covalent-bond
    terms that relaxation removes (see docs/demo.md). None: chgnet's affine stress.

    The 3M position directions (the three Cartesian components of each of the M atoms in
    ``force_atoms``; None = every atom, M = N) and the 6 symmetric strain directions are
    pushed through the backbone ``chunk_size`` at a time (memory grows linearly with
    ``chunk_size``). ``method``: ``"tangent"`` the hand-written batched forward mode
    (:func:`features_jvp`, fastest), ``"vmap"`` ``torch.func.vmap(torch.func.jvp(
    make_features_fn(...)))`` (general), ``"auto"`` the first, or the second for a backbone
    with layers it does not know. Cost: about one backbone pass per direction, so
    O(N x (3M + 6)) instead of O(N^2) for all atoms.
    """
    if method not in {"auto", "tangent", "vmap"}:
        raise ValueError(f"method must be 'auto', 'tangent' or 'vmap', got {method!r}")
    check_model(model)
    n = int(graph.atomic_number.shape[0])
    dtype = graph.lattice.dtype
    index: Tensor | None = None
    if force_atoms is not None:
        index = torch.as_tensor(np.asarray(force_atoms), dtype=torch.long).reshape(-1)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n:
            raise ValueError(f"force_atoms must be indices in [0, {n}), got {index.tolist()}")
        if len(torch.unique(index)) != len(index) or not bool((index[1:] > index[:-1]).all()):
            raise ValueError("force_atoms must be sorted and unique")
    dev = graph.lattice.device  # the graph's device (a CUDA graph + model build on the GPU)
    atoms_idx = torch.arange(n) if index is None else index
    m = len(atoms_idx)
    n_pos = 3 * m if forces else 0
    n_str = len(_SYM_STRAIN) if stress else 0
    n_dir = n_pos + n_str
    t_disp_all = torch.zeros(n_dir, n, 3, dtype=dtype)
    if forces:
        rows = torch.arange(n_pos)
        t_disp_all[rows, atoms_idx.repeat_interleave(3), rows % 3] = 1.0
    t_strain_all = torch.zeros(n_dir, 3, 3, dtype=dtype)
    if stress:
        t_strain_all[n_pos:] = _strain_tangents(dtype)
        if strain_offsets is not None:
            off = torch.as_tensor(np.asarray(strain_offsets), dtype=dtype)
            if tuple(off.shape) != (n, 3):
                raise ValueError(f"strain_offsets must have shape ({n}, 3), got {tuple(off.shape)}")
            t_disp_all[n_pos:] = -torch.einsum("na,kab->knb", off, t_strain_all[n_pos:])
    t_disp_all, t_strain_all = t_disp_all.to(dev), t_strain_all.to(dev)

    if n_dir:  # equal chunks of at most chunk_size (16 + 2 would pay a second primal pass)
        n_chunks = -(-n_dir // max(1, int(chunk_size)))
        chunk_size = -(-n_dir // n_chunks)
    with torch.no_grad():  # forward-mode AD needs no autograd graph
        h: Tensor | None = None
        cols: list[Tensor] = []
        if method in {"auto", "tangent"}:
            try:
                if n_dir == 0:
                    h, _ = features_jvp(
                        model, graph, torch.zeros(1, n, 3, dtype=dtype, device=dev),
                        torch.zeros(1, 3, 3, dtype=dtype, device=dev),
                    )  # fmt: skip
                for s in range(0, n_dir, chunk_size):
                    h, dh = features_jvp(
                        model, graph, t_disp_all[s : s + chunk_size],
                        t_strain_all[s : s + chunk_size],
                    )  # fmt: skip
                    cols.append(dh)
            except Unsupported:
                if method == "tangent":
                    raise
                h, cols = None, []
        if h is None:
            fn = make_features_fn(model, graph)
            disp0 = torch.zeros(n, 3, dtype=dtype, device=dev)
            strain0 = torch.zeros(3, 3, dtype=dtype, device=dev)
            h = fn(disp0, strain0)

            def push(td: Tensor, ts: Tensor) -> Tensor:
                return torch.func.jvp(fn, (disp0, strain0), (td, ts))[1]

            batched = torch.func.vmap(push)
            for s in range(0, n_dir, chunk_size):
                out = batched(t_disp_all[s : s + chunk_size], t_strain_all[s : s + chunk_size])
                cols.append(out.permute(1, 2, 0))
    jac_pos = jac_strain = None
    if n_dir:
        jac = torch.cat(cols, dim=-1)  # (N, 64, n_dir)
        if forces:
            jac_pos = jac[..., :n_pos].reshape(n, FEATURE_DIM, m, 3).contiguous()
        if stress:
            jac_strain = _strain_jacobian(jac[..., n_pos:]).contiguous()
    return FrameFeatures(  # cached features live on the CPU (disk, memory maps)
        h=h.detach().cpu().contiguous(),
        jac_pos=None if jac_pos is None else jac_pos.cpu(),
        jac_strain=None if jac_strain is None else jac_strain.cpu(),
        atomref_energy=_atomref_energy(model, graph),
        volume=_volume(graph),
        n_atoms=n,
        force_index=index if (forces and index is not None) else None,
    )


def jacobian_nbytes(
    n_atoms: int, stress: bool, *, forces: bool = True, force_atoms: int | None = None
) -> int:
    """Bytes one cached frame takes in memory and on disk (float32): h + dh/dR + dh/dstrain.

    All atoms (``force_atoms=None``) grows as ``768 N^2`` bytes (dh/dR): 84 atoms 5.4 MB,
    200 atoms 30.8 MB, 500 atoms 192 MB; M force atoms take ``768 N M`` bytes instead
    (84 atoms, M = 4: 0.26 MB). Stress adds ``2304 N`` bytes (the 3x3 strain Jacobian).
    """
    m = n_atoms if force_atoms is None else min(int(force_atoms), n_atoms)
    n_floats = n_atoms * FEATURE_DIM
    if forces:
        n_floats += n_atoms * FEATURE_DIM * m * 3
    if stress:
        n_floats += n_atoms * FEATURE_DIM * 9
    return 4 * n_floats + (8 * m if forces and m < n_atoms else 0)

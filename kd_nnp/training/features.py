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
:func:`make_features_fn`, a functional re-implementation of ``CHGNet._compute`` up to the
last convolution for ONE graph with its neighbour lists held fixed (exact for derivatives:
chgnet's own neighbour list is fixed during its autograd as well). It calls the model's own
sub-modules; only the few in-place operations of chgnet (``aggregate``, ``Fourier``, the
residual ``+=``) are rewritten out of place so that ``vmap`` can batch them.
See docs/performance.md for measured build/step times and the memory rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor, nn

CACHE_FORMAT_VERSION = 1
EV_PER_A3_TO_GPA = 160.21766208  # chgnet's conversion factor, kept digit for digit
FEATURE_DIM = 64
# parameters that do not influence the cached features (the trainable readout)
READOUT_PREFIXES = ("mlp.", "readout_norm.")
DEFAULT_CHUNK_SIZE = 18  # directions per forward-mode pass (M = 4 + strain: one pass)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "FeatureCache",
    "FrameFeatures",
    "backbone_hash",
    "compute_features",
    "graph_hash",
    "jacobian_nbytes",
    "make_features_fn",
    "predict_from_features",
    "predict_full",
    "molecular_stress",
    "molecule_offsets",
    "select_force_atoms",
]


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


# --------------------------------------------------------------------------------------
# the backbone as a function of (displacement, strain) for one graph
# --------------------------------------------------------------------------------------
def _check_model(model: CHGNet) -> None:
    if not getattr(model, "mlp_first", False):
        raise ValueError(
            "feature caching needs a CHGNet with mlp_first=True (energy = sum of per-atom "
            "MLP outputs), as CHGNet 0.3.0; this model pools before its MLP"
        )
    if model.composition_model is None:
        raise ValueError("feature caching expects a CHGNet with an AtomRef composition model")


def _sum_rows(data: Tensor, owners: Tensor, n_owner: int) -> Tensor:
    """Out-of-place ``chgnet.model.functions.aggregate(average=False)`` (vmap friendly)."""
    return data.new_zeros((n_owner, data.shape[-1])).index_add(0, owners, data)


def _fourier(x: Tensor, frequencies: Tensor) -> Tensor:
    """Out-of-place ``chgnet.model.basis.Fourier.forward``."""
    tmp = torch.outer(x, frequencies)
    const = (1 / torch.sqrt(torch.tensor([2.0], dtype=x.dtype, device=x.device))).expand(
        x.shape[0], 1
    )
    return torch.cat([const, torch.sin(tmp), torch.cos(tmp)], dim=1) / np.sqrt(np.pi)


def _finish(new: Tensor, residual: Tensor, mlp_out: nn.Module | None, resnet: bool,
            norm: nn.Module | None) -> Tensor:  # fmt: skip
    """The common end of chgnet's conv layers: optional ``mlp_out``, residual, norm."""
    if mlp_out is not None:
        new = mlp_out(new)
    if resnet:
        new = new + residual
    if norm is not None:
        new = norm(new)
    return new


def _atom_conv(layer: nn.Module, atom_feas: Tensor, bond_feas: Tensor, bond_weights: Tensor,
               atom_graph: Tensor, d2u: Tensor) -> Tensor:  # fmt: skip
    center = torch.index_select(atom_feas, 0, atom_graph[:, 0])
    nbr = torch.index_select(atom_feas, 0, atom_graph[:, 1])
    bonds = torch.index_select(bond_feas, 0, d2u)
    messages = layer.twoBody_atom(torch.cat([center, bonds, nbr], dim=1))
    messages = messages * torch.index_select(bond_weights, 0, d2u)
    new = _sum_rows(messages, atom_graph[:, 0], atom_feas.shape[0])
    mlp_out = layer.mlp_out if layer.use_mlp_out else None
    return _finish(new, atom_feas, mlp_out, layer.resnet, layer.atom_norm)


def _bond_conv(layer: nn.Module, atom_feas: Tensor, bond_feas: Tensor, bond_weights: Tensor,
               angle_feas: Tensor, bond_graph: Tensor) -> Tensor:  # fmt: skip
    center = torch.index_select(atom_feas, 0, bond_graph[:, 0])
    bi = torch.index_select(bond_feas, 0, bond_graph[:, 1])
    bj = torch.index_select(bond_feas, 0, bond_graph[:, 2])
    update = layer.twoBody_bond(torch.cat([bi, bj, angle_feas, center], dim=1))
    update = (
        update
        * torch.index_select(bond_weights, 0, bond_graph[:, 1])
        * torch.index_select(bond_weights, 0, bond_graph[:, 2])
    )
    new = _sum_rows(update, bond_graph[:, 1], bond_feas.shape[0])
    mlp_out = layer.mlp_out if layer.use_mlp_out else None
    return _finish(new, bond_feas, mlp_out, layer.resnet, layer.bond_norm)


def _angle_update(layer: nn.Module, atom_feas: Tensor, bond_feas: Tensor, angle_feas: Tensor,
                  bond_graph: Tensor) -> Tensor:  # fmt: skip
    center = torch.index_select(atom_feas, 0, bond_graph[:, 0])
    bi = torch.index_select(bond_feas, 0, bond_graph[:, 1])
    bj = torch.index_select(bond_feas, 0, bond_graph[:, 2])
    new = layer.twoBody_bond(torch.cat([bi, bj, angle_feas, center], dim=1))
    return _finish(new, angle_feas, None, layer.resnet, layer.angle_norm)


def make_features_fn(model: CHGNet, graph: CrystalGraph) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(displacement (N,3), strain (3,3)) -> h (N,64)`` for one graph, neighbours fixed.

    Reproduces ``BatchedGraph.from_graphs`` + ``CHGNet._compute`` up to (and including) the
    last atom convolution, before ``readout_norm``. Positions are
    ``frac @ (lattice @ (1 + strain)) + displacement``; at ``(0, 0)`` this is chgnet's
    forward pass, and derivatives w.r.t. ``displacement`` / ``strain`` are chgnet's
    ``atom_positions`` / ``strains`` derivatives.
    """
    _check_model(model)
    lattice0 = graph.lattice.detach()
    frac = graph.atom_frac_coord.detach()
    atom_graph = graph.atom_graph
    if atom_graph.dim() == 1:  # structure with all atoms isolated (as chgnet does)
        atom_graph = atom_graph.reshape(0, 2)
    image = graph.neighbor_image.to(lattice0.dtype)
    d2u = graph.directed2undirected
    u2d = graph.undirected2directed
    bond_graph_full = graph.bond_graph
    has_angles = len(bond_graph_full) != 0
    if has_angles:
        bond_graph = bond_graph_full[:, [0, 1, 3]]
        dir_i, dir_j = bond_graph_full[:, 2], bond_graph_full[:, 4]
    atom_numbers = graph.atomic_number
    eye = torch.eye(3, dtype=lattice0.dtype, device=lattice0.device)
    bbe = model.bond_basis_expansion
    freqs = model.angle_basis_expansion.fourier_expansion.frequencies
    n_conv = model.n_conv

    def features(displacement: Tensor, strain: Tensor) -> Tensor:
        lattice = lattice0 @ (eye + strain)
        pos = frac @ lattice + displacement
        center = pos[atom_graph[:, 0]]
        neighbor = pos[atom_graph[:, 1]] + image @ lattice
        bond_vectors = center - neighbor
        bond_lengths = torch.linalg.vector_norm(bond_vectors, dim=1)
        bond_vectors = bond_vectors / bond_lengths[:, None]
        und_lengths = torch.index_select(bond_lengths, 0, u2d)
        bond_bases_ag = bbe.rbf_expansion_ag(und_lengths)
        bond_bases_bg = bbe.rbf_expansion_bg(und_lengths)

        atom_feas = model.atom_embedding(atom_numbers - 1)
        bond_feas = model.bond_embedding(bond_bases_ag)
        bond_weights_ag = model.bond_weights_ag(bond_bases_ag)
        bond_weights_bg = model.bond_weights_bg(bond_bases_bg)
        if has_angles:
            vi = torch.index_select(bond_vectors, 0, dir_i)
            vj = torch.index_select(bond_vectors, 0, dir_j)
            cosine = torch.sum(vi * vj, dim=1) * (1 - 1e-6)
            angle_feas = model.angle_embedding(_fourier(torch.acos(cosine), freqs))

        for idx in range(n_conv - 1):
            atom_feas = _atom_conv(
                model.atom_conv_layers[idx], atom_feas, bond_feas, bond_weights_ag,
                atom_graph, d2u,
            )  # fmt: skip
            bond_layer = model.bond_conv_layers[idx]
            angle_layer = model.angle_layers[idx]
            if has_angles and bond_layer is not None:
                bond_feas = _bond_conv(
                    bond_layer, atom_feas, bond_feas, bond_weights_bg, angle_feas, bond_graph
                )
                if angle_layer is not None:
                    angle_feas = _angle_update(
                        angle_layer, atom_feas, bond_feas, angle_feas, bond_graph
                    )
        return _atom_conv(
            model.atom_conv_layers[-1], atom_feas, bond_feas, bond_weights_ag, atom_graph, d2u
        )

    return features


# --------------------------------------------------------------------------------------
# hand-written batched forward-mode AD of the same function (the fast Jacobian builder)
# --------------------------------------------------------------------------------------
# Tangents are carried as (rows, B, F) next to the (rows, F) primal; None means zero. The
# primal is computed once for all B directions (functorch's vmap(jvp) recomputes nothing
# either, but its batching rules for index_select/index_add/LayerNorm copy a lot); the
# geometric bases are functions of one scalar per row (bond length / cosine), so their
# tangents are derivative-of-basis x scalar tangent. Only Linear/SiLU/Sigmoid/LayerNorm/
# Dropout(p=0) are supported: :func:`compute_features` falls back to vmap(jvp) otherwise.
Pair = tuple[Tensor, Tensor | None]


class _Unsupported(Exception):
    pass


def _t_linear(layer: nn.Linear, x: Tensor, dx: Tensor | None) -> Pair:
    y = layer(x)
    return y, None if dx is None else dx @ layer.weight.T


Part = tuple[Pair, Tensor | None]  # (source rows, gather index or None)


def _t_silu(x: Tensor, dx: Tensor | None) -> Pair:
    s = torch.sigmoid(x)
    y = x * s
    return y, None if dx is None else dx * (s * (1 + x * (1 - s))).unsqueeze(1)


def _t_sigmoid(x: Tensor, dx: Tensor | None) -> Pair:
    s = torch.sigmoid(x)
    return s, None if dx is None else dx * (s * (1 - s)).unsqueeze(1)


def _t_layer_norm(ln: nn.LayerNorm, x: Tensor, dx: Tensor | None) -> Pair:
    y = ln(x)
    if dx is None:
        return y, None
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + ln.eps)
    xhat = ((x - mu) * rstd).unsqueeze(1)
    dxhat = (dx - dx.mean(-1, keepdim=True) - xhat * (dx * xhat).mean(-1, keepdim=True)) * (
        rstd.unsqueeze(1)
    )
    return y, dxhat * ln.weight if ln.weight is not None else dxhat


def _t_module(mod: nn.Module, x: Tensor, dx: Tensor | None) -> Pair:
    if isinstance(mod, nn.Linear):
        return _t_linear(mod, x, dx)
    if isinstance(mod, nn.SiLU):
        return _t_silu(x, dx)
    if isinstance(mod, nn.Sigmoid):
        return _t_sigmoid(x, dx)
    if isinstance(mod, nn.LayerNorm):
        return _t_layer_norm(mod, x, dx)
    if isinstance(mod, nn.Dropout) and (mod.p == 0 or not mod.training):
        return x, dx
    if isinstance(mod, nn.Sequential):
        for sub in mod:
            x, dx = _t_module(sub, x, dx)
        return x, dx
    if type(mod).__name__ == "MLP" and hasattr(mod, "layers"):
        return _t_module(mod.layers, x, dx)
    raise _Unsupported(type(mod).__name__)


def _plain_layers(mlp: nn.Module) -> list[nn.Module]:
    """Layers of a chgnet MLP as [Linear, (SiLU, Linear)*], dropping Dropout(p=0)."""
    layers = [m for m in mlp.layers if not (isinstance(m, nn.Dropout) and m.p == 0)]
    ok = bool(layers) and all(
        isinstance(m, nn.Linear) if i % 2 == 0 else isinstance(m, nn.SiLU)
        for i, m in enumerate(layers)
    )
    if not ok or len(layers) % 2 == 0:
        raise _Unsupported(f"MLP layers {[type(m).__name__ for m in layers]}")
    return layers


def _t_gated_mlp(gmlp: nn.Module, parts: Sequence[Part]) -> Pair:
    """Tangent of chgnet's GatedMLP silu(LN1(core(x))) * sigmoid(LN2(gate(x))), fused.

    The first Linear of core and gate is one product on the source rows; the LayerNorm
    centring is folded into the preceding weight (W - mean_out(W)); activation and gate
    derivatives are folded into one per-row factor, so few full passes over (rows, B, F).
    """
    if not (isinstance(gmlp.activation, nn.SiLU) and isinstance(gmlp.sigmoid, nn.Sigmoid)):
        raise _Unsupported("GatedMLP activation")
    use_ln = gmlp.norm is not None
    if use_ln and not (isinstance(gmlp.bn1, nn.LayerNorm) and isinstance(gmlp.bn2, nn.LayerNorm)):
        raise _Unsupported("GatedMLP norm")
    branches = [_plain_layers(gmlp.mlp_core), _plain_layers(gmlp.mlp_gate)]
    norms = [gmlp.bn1, gmlp.bn2] if use_ln else [None, None]

    xs = [p if idx is None else torch.index_select(p, 0, idx) for (p, _), idx in parts]
    x = torch.cat(xs, dim=-1)
    # primal, keeping pre-activations; tangent weights (centred when LN follows)
    pres: list[list[Tensor]] = []
    outs: list[Tensor] = []
    t_weights: list[list[Tensor]] = []
    for layers, ln in zip(branches, norms, strict=True):
        z, pre, ws = x, [], []
        for i, m in enumerate(layers):
            if isinstance(m, nn.Linear):
                z = m(z)
                w = m.weight
                if ln is not None and i == len(layers) - 1:
                    w = w - w.mean(0, keepdim=True)
                ws.append(w)
            else:
                pre.append(z)
                z = nn.functional.silu(z)
        pres.append(pre)
        outs.append(z)
        t_weights.append(ws)

    # first Linear of both branches in one product per part, before the gather
    w_first = torch.cat([t_weights[0][0], t_weights[1][0]], dim=0)
    d_first, start = None, 0
    for xp, ((_, dp), idx) in zip(xs, parts, strict=True):
        stop = start + xp.shape[-1]
        if dp is not None:
            term = dp @ w_first[:, start:stop].T
            if idx is not None:
                term = torch.index_select(term, 0, idx)
            d_first = term if d_first is None else d_first.add_(term)
        start = stop
    ys: list[Tensor] = []
    factors: list[Tensor] = []
    u: list[Tensor | None] = []
    for k, (layers, ln) in enumerate(zip(branches, norms, strict=True)):
        f_out = outs[k].shape[-1] if len(layers) == 1 else layers[0].out_features
        d = None if d_first is None else d_first[..., k * f_out : (k + 1) * f_out]
        for j, pre in enumerate(pres[k]):
            if d is not None:
                sg = torch.sigmoid(pre)
                d = (d * (sg * (1 + pre * (1 - sg))).unsqueeze(1)) @ t_weights[k][j + 1].T
        z = outs[k]
        if ln is not None:
            mu = z.mean(-1, keepdim=True)
            rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps)
            xhat = (z - mu) * rstd
            y = xhat * ln.weight + ln.bias if ln.bias is not None else xhat * ln.weight
            scale = rstd * ln.weight
            if d is not None:  # d is already centred: LN tangent = scale*(d - xhat <d,xhat>/F)
                dot = (d * xhat.unsqueeze(1)).sum(-1, keepdim=True)
                d = torch.addcmul(d, xhat.unsqueeze(1), dot, value=-1.0 / z.shape[-1])
        else:
            y, scale = z, torch.ones_like(z[:1])
        ys.append(y)
        u.append(d)
        factors.append(scale)
    core_s = torch.sigmoid(ys[0])
    core = ys[0] * core_s
    gate = torch.sigmoid(ys[1])
    out = core * gate
    if u[0] is None and u[1] is None:
        return out, None
    c_core = (core_s * (1 + ys[0] * (1 - core_s))) * factors[0] * gate
    c_gate = (gate * (1 - gate)) * factors[1] * core
    terms = [ud * c.unsqueeze(1) for ud, c in ((u[0], c_core), (u[1], c_gate)) if ud is not None]
    return out, terms[0] if len(terms) == 1 else terms[0].add_(terms[1])


def _t_mul(a: Pair, b: Pair) -> Pair:
    (x, dx), (y, dy) = a, b
    d = None
    if dx is not None:
        d = dx * y.unsqueeze(1)
    if dy is not None:
        term = dy * x.unsqueeze(1)
        d = term if d is None else d + term
    return x * y, d


def _t_add(a: Pair, b: Pair) -> Pair:
    (x, dx), (y, dy) = a, b
    d = dx if dy is None else (dy if dx is None else dx + dy)
    return x + y, d


def _t_select(a: Pair, idx: Tensor) -> Pair:
    x, dx = a
    return torch.index_select(x, 0, idx), None if dx is None else torch.index_select(dx, 0, idx)


def _t_sum_rows(a: Pair, owners: Tensor, n_owner: int) -> Pair:
    x, dx = a
    y = _sum_rows(x, owners, n_owner)
    if dx is None:
        return y, None
    flat = dx.reshape(dx.shape[0], -1)
    dy = flat.new_zeros((n_owner, flat.shape[1])).index_add_(0, owners, flat)
    return y, dy.reshape(n_owner, *dx.shape[1:])


def _t_finish(new: Pair, residual: Pair, mlp_out: nn.Module | None, resnet: bool,
              norm: nn.Module | None) -> Pair:  # fmt: skip
    """:func:`_finish` on (value, tangent) pairs."""
    if mlp_out is not None:
        new = _t_module(mlp_out, *new)
    if resnet:
        new = _t_add(new, residual)
    if norm is not None:
        new = _t_module(norm, *new)
    return new


def _t_atom_conv(layer: nn.Module, atom: Pair, bond: Pair, weight: Pair, atom_graph: Tensor,
                 d2u: Tensor) -> Pair:  # fmt: skip
    parts = ((atom, atom_graph[:, 0]), (bond, d2u), (atom, atom_graph[:, 1]))
    msg = _t_mul(_t_gated_mlp(layer.twoBody_atom, parts), _t_select(weight, d2u))
    new = _t_sum_rows(msg, atom_graph[:, 0], atom[0].shape[0])
    mlp_out = layer.mlp_out if layer.use_mlp_out else None
    return _t_finish(new, atom, mlp_out, layer.resnet, layer.atom_norm)


def _t_bond_conv(layer: nn.Module, atom: Pair, bond: Pair, weight: Pair, angle: Pair,
                 bond_graph: Tensor) -> Pair:  # fmt: skip
    parts = (
        (bond, bond_graph[:, 1]),
        (bond, bond_graph[:, 2]),
        (angle, None),
        (atom, bond_graph[:, 0]),
    )
    upd = _t_gated_mlp(layer.twoBody_bond, parts)
    upd = _t_mul(_t_mul(upd, _t_select(weight, bond_graph[:, 1])),
                 _t_select(weight, bond_graph[:, 2]))  # fmt: skip
    new = _t_sum_rows(upd, bond_graph[:, 1], bond[0].shape[0])
    mlp_out = layer.mlp_out if layer.use_mlp_out else None
    return _t_finish(new, bond, mlp_out, layer.resnet, layer.bond_norm)


def _t_angle_update(layer: nn.Module, atom: Pair, bond: Pair, angle: Pair,
                    bond_graph: Tensor) -> Pair:  # fmt: skip
    parts = (
        (bond, bond_graph[:, 1]),
        (bond, bond_graph[:, 2]),
        (angle, None),
        (atom, bond_graph[:, 0]),
    )
    new = _t_gated_mlp(layer.twoBody_bond, parts)
    return _t_finish(new, angle, None, layer.resnet, layer.angle_norm)


def _basis_and_slope(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise basis f(x) (rows, K) of a scalar per row and its derivative df/dx (rows, K)."""
    return torch.func.jvp(fn, (x,), (torch.ones_like(x),))


def features_jvp(
    model: CHGNet, graph: CrystalGraph, t_disp: Tensor, t_strain: Tensor
) -> tuple[Tensor, Tensor]:
    """h (N,64) and its directional derivatives (N,64,B) along B input directions.

    ``t_disp`` (B,N,3) and ``t_strain`` (B,3,3) are the tangents of the displacement and
    the strain of :func:`make_features_fn`; the result equals
    ``vmap(jvp(make_features_fn(model, graph)))`` to float32 rounding.
    """
    _check_model(model)
    lattice0 = graph.lattice.detach()
    frac = graph.atom_frac_coord.detach()
    atom_graph = graph.atom_graph
    if atom_graph.dim() == 1:
        atom_graph = atom_graph.reshape(0, 2)
    image = graph.neighbor_image.to(lattice0.dtype)
    d2u, u2d = graph.directed2undirected, graph.undirected2directed
    bond_graph_full = graph.bond_graph
    has_angles = len(bond_graph_full) != 0
    n_dir = t_disp.shape[0]

    # geometry, primal and tangents (layout: rows, B, ...)
    pos = frac @ lattice0
    vec = pos[atom_graph[:, 0]] - pos[atom_graph[:, 1]] - image @ lattice0
    length = torch.linalg.vector_norm(vec, dim=1)
    unit = vec / length[:, None]
    d_lat = lattice0 @ t_strain  # (B,3,3)
    d_pos = torch.einsum("nk,bkj->nbj", frac, d_lat) + t_disp.transpose(0, 1)  # (N,B,3)
    d_vec = (
        d_pos[atom_graph[:, 0]]
        - d_pos[atom_graph[:, 1]]
        - torch.einsum("ek,bkj->ebj", image, d_lat)
    )  # (E,B,3)
    d_len = (d_vec * unit[:, None, :]).sum(-1)  # (E,B)
    d_unit = (d_vec - unit[:, None, :] * d_len[..., None]) / length[:, None, None]

    bbe = model.bond_basis_expansion
    und_len = torch.index_select(length, 0, u2d)
    d_und_len = torch.index_select(d_len, 0, u2d)
    bb_ag, slope_ag = _basis_and_slope(bbe.rbf_expansion_ag, und_len)
    bb_bg, slope_bg = _basis_and_slope(bbe.rbf_expansion_bg, und_len)

    def embed(layer: nn.Linear, basis: Tensor, slope: Tensor, d_scalar: Tensor) -> Pair:
        if layer.bias is not None:
            raise _Unsupported("basis embedding with bias")
        return layer(basis), d_scalar.unsqueeze(-1) * (slope @ layer.weight.T).unsqueeze(1)

    atom: Pair = (model.atom_embedding(graph.atomic_number - 1), None)
    bond = embed(model.bond_embedding, bb_ag, slope_ag, d_und_len)
    w_ag = embed(model.bond_weights_ag, bb_ag, slope_ag, d_und_len)
    w_bg = embed(model.bond_weights_bg, bb_bg, slope_bg, d_und_len)
    if has_angles:
        bond_graph = bond_graph_full[:, [0, 1, 3]]
        ui, uj = unit[bond_graph_full[:, 2]], unit[bond_graph_full[:, 4]]
        dui, duj = d_unit[bond_graph_full[:, 2]], d_unit[bond_graph_full[:, 4]]
        scale = 1 - 1e-6
        cosine = torch.sum(ui * uj, dim=1) * scale
        d_cos = ((dui * uj[:, None, :]).sum(-1) + (ui[:, None, :] * duj).sum(-1)) * scale
        freqs = model.angle_basis_expansion.fourier_expansion.frequencies
        ab, slope_ab = _basis_and_slope(lambda c: _fourier(torch.acos(c), freqs), cosine)
        angle = embed(model.angle_embedding, ab, slope_ab, d_cos)

    for idx in range(model.n_conv - 1):
        atom = _t_atom_conv(model.atom_conv_layers[idx], atom, bond, w_ag, atom_graph, d2u)
        bond_layer, angle_layer = model.bond_conv_layers[idx], model.angle_layers[idx]
        if has_angles and bond_layer is not None:
            bond = _t_bond_conv(bond_layer, atom, bond, w_bg, angle, bond_graph)
            if angle_layer is not None:
                angle = _t_angle_update(angle_layer, atom, bond, angle, bond_graph)
    h, dh = _t_atom_conv(model.atom_conv_layers[-1], atom, bond, w_ag, atom_graph, d2u)
    if dh is None:  # no bonds at all
        dh = h.new_zeros((h.shape[0], n_dir, h.shape[1]))
    return h, dh.permute(0, 2, 1)


# --------------------------------------------------------------------------------------
# building the features of one frame
# --------------------------------------------------------------------------------------
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
_SYM_STRAIN = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


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


def molecule_offsets(atoms: Any) -> np.ndarray:
    """(N, 3) position of each atom relative to the geometric centre of its molecule, with
    molecules unwrapped across the cell (the centre the demo's rigid strains use).

    Raises ValueError for a covalent network that percolates through the cell."""
    from kd_nnp.data.sources.perturb import molecule_centres

    _, pos, centres = molecule_centres(atoms)
    return pos - centres


def molecular_stress(stress: np.ndarray, forces: np.ndarray, offsets: np.ndarray,
                     volume: float) -> np.ndarray:  # fmt: skip
    """Molecule-rigid stress from a calculator's stress and forces (same units as ``stress``
    per eV/A^3: ASE's sign, Voigt (6,) in, Voigt (6,) out, symmetrised):
    ``sigma_mol = sigma + offsets^T F / V``, the derivative of the energy (per volume) along
    strains that move molecules rigidly (:func:`compute_features` with ``strain_offsets``)."""
    from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

    full = voigt_6_to_full_3x3_stress(np.asarray(stress, dtype=float))
    extra = np.asarray(offsets, dtype=float).T @ np.asarray(forces, dtype=float) / volume
    return full_3x3_to_voigt_6_stress(full + 0.5 * (extra + extra.T))


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
    _check_model(model)
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
            except _Unsupported:
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


def compute_jacobian_reverse(
    model: CHGNet, graph: CrystalGraph, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """dh/dR (N,64,N,3) by reverse mode (vmap over ``vjp`` of the 64N outputs).

    Kept as a cross-check and for the build-time comparison in docs/performance.md;
    :func:`compute_features` (forward mode over 3N directions) is faster for CHGNet.
    """
    fn = make_features_fn(model, graph)
    n = int(graph.atomic_number.shape[0])
    dtype = graph.lattice.dtype
    strain0 = torch.zeros(3, 3, dtype=dtype)
    with torch.no_grad():
        _, vjp_fn = torch.func.vjp(lambda d: fn(d, strain0), torch.zeros(n, 3, dtype=dtype))
        cot = torch.eye(n * FEATURE_DIM, dtype=dtype).reshape(-1, n, FEATURE_DIM)
        rows = [
            torch.func.vmap(vjp_fn)(cot[s : s + chunk_size])[0].detach()
            for s in range(0, len(cot), chunk_size)
        ]
    return torch.cat(rows, dim=0).reshape(n, FEATURE_DIM, n, 3)


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


# --------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------
def predict_from_features(
    mlp: nn.Module,
    readout_norm: nn.Module | None,
    feats: Sequence[FrameFeatures],
    *,
    forces: bool,
    stress: bool,
) -> dict[str, Tensor | list[Tensor]]:
    """CHGNet predictions of a batch of frames from cached features.

    ``readout_norm`` is the model's LayerNorm (frozen or trainable); ``None`` means the model
    has none (``CHGNet(readout_norm=None)``), not "skip it". Returns ``'e'`` (B,) eV/atom
    including AtomRef, and if requested ``'f'`` list of (N_i,3) eV/A with ``'f_mask'`` list of
    (N_i,) booleans (False for atoms outside a frame's cached force subset, whose rows are
    0) and ``'s'`` list of (3,3) GPa with chgnet's sign. Differentiable w.r.t. the parameters of ``mlp`` and
    ``readout_norm``.
    """
    if not feats:
        raise ValueError("predict_from_features needs at least one frame")
    for i, fr in enumerate(feats):
        if forces and fr.jac_pos is None:
            raise ValueError(f"frame {i} ({fr.n_atoms} atoms) has no dh/dR but forces asked")
        if stress and fr.jac_strain is None:
            raise ValueError(f"frame {i} ({fr.n_atoms} atoms) has no dh/dstrain but stress asked")
    sizes = [fr.n_atoms for fr in feats]
    dev = next(mlp.parameters()).device  # cached arrays are on the CPU; the MLP may be on a GPU
    h = torch.cat([fr.h for fr in feats], dim=0).to(dev)
    need_grad = forces or stress
    if need_grad:
        h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        x = readout_norm(h) if readout_norm is not None else h
        site = mlp(x).view(-1)
        owners = torch.repeat_interleave(
            torch.arange(len(feats), device=dev), torch.tensor(sizes, device=dev)
        )
        e_total = site.new_zeros(len(feats)).index_add(0, owners, site)
        if need_grad:
            (g,) = torch.autograd.grad(e_total.sum(), h, create_graph=True)
    atomref = torch.tensor([fr.atomref_energy for fr in feats], dtype=e_total.dtype, device=dev)
    n_at = torch.tensor(sizes, dtype=e_total.dtype, device=dev)
    out: dict[str, Tensor | list[Tensor]] = {"e": (e_total + atomref) / n_at}
    if need_grad:
        gs = torch.split(g, sizes)
        if forces:
            out["f"], out["f_mask"] = [], []
            for gi, fr, n in zip(gs, feats, sizes, strict=True):
                m = fr.jac_pos.shape[2]
                jac = fr.jac_pos.reshape(n * FEATURE_DIM, m * 3).to(dev)
                f_sub = -(gi.reshape(1, -1) @ jac)
                if fr.force_index is None:
                    out["f"].append(f_sub.reshape(n, 3))
                    out["f_mask"].append(torch.ones(n, dtype=torch.bool, device=dev))
                else:  # forces of the M cached atoms; the other rows are 0 and masked out
                    idx = fr.force_index.to(dev)
                    out["f"].append(f_sub.new_zeros((n, 3)).index_copy(0, idx, f_sub.reshape(m, 3)))
                    mask = torch.zeros(n, dtype=torch.bool, device=dev)
                    mask[idx] = True
                    out["f_mask"].append(mask)
        if stress:
            out["s"] = [
                (gi.reshape(1, -1) @ fr.jac_strain.reshape(n * FEATURE_DIM, 9).to(dev)).reshape(
                    3, 3
                )
                * (EV_PER_A3_TO_GPA / fr.volume)
                for gi, fr, n in zip(gs, feats, sizes, strict=True)
            ]
    return out


def predict_full(
    model: CHGNet, graphs: Sequence[CrystalGraph], *, forces: bool, stress: bool
) -> dict[str, Tensor | list[Tensor]]:
    """The reference path: chgnet's own forward (autograd through the whole backbone)."""
    task = "e" + ("f" if forces else "") + ("s" if stress else "")
    pred = model(list(graphs), task=task)
    out: dict[str, Tensor | list[Tensor]] = {"e": pred["e"]}
    if forces:
        out["f"] = list(pred["f"])
    if stress:
        out["s"] = list(pred["s"])
    return out


# --------------------------------------------------------------------------------------
# content-addressed on-disk cache
# --------------------------------------------------------------------------------------
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
        _check_model(model)
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

    def clear(self) -> None:
        """Remove every entry of this cache format version under ``root``."""
        shutil.rmtree(self.root / f"v{CACHE_FORMAT_VERSION}", ignore_errors=True)

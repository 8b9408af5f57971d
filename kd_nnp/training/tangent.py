"""Hand-written batched forward-mode AD of :func:`kd_nnp.training.backbone.make_features_fn`
(the fast Jacobian builder of :func:`kd_nnp.training.jacobian.compute_features`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor, nn

from kd_nnp.training.backbone import check_model, fourier, sum_rows

# hand-written batched forward-mode AD of the same function (the fast Jacobian builder)
# --------------------------------------------------------------------------------------
# Tangents are carried as (rows, B, F) next to the (rows, F) primal; None means zero. The
# primal is computed once for all B directions (functorch's vmap(jvp) recomputes nothing
# either, but its batching rules for index_select/index_add/LayerNorm copy a lot); the
# geometric bases are functions of one scalar per row (bond length / cosine), so their
# tangents are derivative-of-basis x scalar tangent. Only Linear/SiLU/Sigmoid/LayerNorm/
# Dropout(p=0) are supported: :func:`compute_features` falls back to vmap(jvp) otherwise.
Pair = tuple[Tensor, Tensor | None]


class Unsupported(Exception):
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
    raise Unsupported(type(mod).__name__)


def _plain_layers(mlp: nn.Module) -> list[nn.Module]:
    """Layers of a chgnet MLP as [Linear, (SiLU, Linear)*], dropping Dropout(p=0)."""
    layers = [m for m in mlp.layers if not (isinstance(m, nn.Dropout) and m.p == 0)]
    ok = bool(layers) and all(
        isinstance(m, nn.Linear) if i % 2 == 0 else isinstance(m, nn.SiLU)
        for i, m in enumerate(layers)
    )
    if not ok or len(layers) % 2 == 0:
        raise Unsupported(f"MLP layers {[type(m).__name__ for m in layers]}")
    return layers


def _t_gated_mlp(gmlp: nn.Module, parts: Sequence[Part]) -> Pair:
    """Tangent of chgnet's GatedMLP silu(LN1(core(x))) * sigmoid(LN2(gate(x))), fused.

    The first Linear of core and gate is one product on the source rows; the LayerNorm
    centring is folded into the preceding weight (W - mean_out(W)); activation and gate
    derivatives are folded into one per-row factor, so few full passes over (rows, B, F).
    """
    if not (isinstance(gmlp.activation, nn.SiLU) and isinstance(gmlp.sigmoid, nn.Sigmoid)):
        raise Unsupported("GatedMLP activation")
    use_ln = gmlp.norm is not None
    if use_ln and not (isinstance(gmlp.bn1, nn.LayerNorm) and isinstance(gmlp.bn2, nn.LayerNorm)):
        raise Unsupported("GatedMLP norm")
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
    y = sum_rows(x, owners, n_owner)
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
    check_model(model)
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
            raise Unsupported("basis embedding with bias")
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
        ab, slope_ab = _basis_and_slope(lambda c: fourier(torch.acos(c), freqs), cosine)
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

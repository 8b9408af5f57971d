"""CHGNet's frozen backbone as a function of (displacement, strain) for one graph.

:func:`make_features_fn` reproduces ``CHGNet._compute`` up to the last atom convolution
(the features ``h`` the trainable readout sees), with the neighbour lists held fixed; only the
in-place operations of chgnet (``aggregate``, ``Fourier``, the residual ``+=``) are rewritten
out of place so that ``torch.func.vmap`` can batch them. The method is described in
:mod:`kd_nnp.training.jacobian`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor, nn

FEATURE_DIM = 64


def check_model(model: CHGNet) -> None:
    if not getattr(model, "mlp_first", False):
        raise ValueError(
            "feature caching needs a CHGNet with mlp_first=True (energy = sum of per-atom "
            "MLP outputs), as CHGNet 0.3.0; this model pools before its MLP"
        )
    if model.composition_model is None:
        raise ValueError("feature caching expects a CHGNet with an AtomRef composition model")


def sum_rows(data: Tensor, owners: Tensor, n_owner: int) -> Tensor:
    """Out-of-place ``chgnet.model.functions.aggregate(average=False)`` (vmap friendly)."""
    return data.new_zeros((n_owner, data.shape[-1])).index_add(0, owners, data)


def fourier(x: Tensor, frequencies: Tensor) -> Tensor:
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
    new = sum_rows(messages, atom_graph[:, 0], atom_feas.shape[0])
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
    new = sum_rows(update, bond_graph[:, 1], bond_feas.shape[0])
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
    check_model(model)
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
            angle_feas = model.angle_embedding(fourier(torch.acos(cosine), freqs))

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

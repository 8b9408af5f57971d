"""Student predictions: from cached features (chain rule through the cached Jacobians) or
through chgnet's own forward (autograd through the whole backbone); both exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor, nn

from kd_nnp.training.backbone import FEATURE_DIM
from kd_nnp.training.jacobian import FrameFeatures
from kd_nnp.training.stress import EV_PER_A3_TO_GPA


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

"""``model.backend=lean``: exact energies, forces and stress of the frozen-backbone student
without a second-order graph through the backbone (issue 17).

With the backbone frozen, the per-atom features ``h(R, eps)`` (:func:`make_features_fn`) do
not depend on the trained parameters theta, and per frame

    E     = sum_i MLP_theta(LN(h_i)) + E_atomref,       g = dE/dh        (N, 64)
    F     = -J_R^T g,                                    J_R   = dh/dR
    sigma = c/V J_eps^T g    (c = eV/A^3 -> GPa),        J_eps = dh/deps

(chgnet's own sign and units: ``CHGNet._compute``). Forces and stress are *linear in g*, so
for any loss L the chain rule through them is ``dL/dg = J_R(-dL/dF) + J_eps(c/V dL/dsigma)``:
one Jacobian-vector product of the backbone (forward mode), and from g on, second-order
autograd only through the MLP. A step per frame:

1. one backbone forward with ``displacement`` / ``strain`` as the only autograd leaves (the
   backbone has no trainable parameter);
2. ``g = autograd.grad(E, h_leaf, create_graph=True)`` with ``h`` detached as a leaf (second
   order through the MLP and the readout norm only);
3. ``F`` and ``dE/deps`` by one vector-Jacobian product of the backbone graph with
   ``g.detach()`` (no ``create_graph``): the backbone graph is freed frame by frame;
4. :class:`_ForceStress` makes ``(F, sigma)`` differentiable functions of ``g``: its backward
   is the JVP above, by the hand-written tangent code (:func:`features_jvp`; it recomputes the
   frame's backbone forward) or ``torch.func.jvp`` for models it does not cover.

So the whole prediction stays an ordinary autograd graph (any loss, the molecular stress
correction and Lightning's ``backward`` work unchanged), while the memory of a step is one
frame's first-order backbone graph plus O(atoms) MLP terms instead of the second-order graph
of the whole batch (measured in docs/performance.md, "Lean path"). Every tensor is created on
the device of the graphs and the model: CUDA works as the CPU does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from torch import Tensor

from kd_nnp.training.backbone import make_features_fn
from kd_nnp.training.stress import EV_PER_A3_TO_GPA
from kd_nnp.training.tangent import Unsupported, features_jvp


def _backbone_jvp(model: CHGNet, graph: CrystalGraph, t_disp: Tensor, t_strain: Tensor) -> Tensor:
    """``J_R t_disp + J_eps t_strain`` (N, 64) of one frame (forward mode, no autograd graph)."""
    with torch.no_grad():
        try:
            _, dh = features_jvp(model, graph, t_disp[None], t_strain[None])
            return dh[..., 0]
        except Unsupported:  # a backbone the hand-written tangents do not cover
            fn = make_features_fn(model, graph)
            disp0 = torch.zeros_like(t_disp)
            strain0 = torch.zeros_like(t_strain)
            return torch.func.jvp(fn, (disp0, strain0), (t_disp, t_strain))[1]


class _ForceStress(torch.autograd.Function):
    """``(F, sigma) = (-J_R^T g, c/V J_eps^T g)`` of one frame, values computed beforehand
    (by the VJP of :func:`_frame`); backward: ``dg = J_R(-dF) + J_eps(c/V dsigma)``."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, forces: Tensor, stress: Tensor, model: CHGNet,
                graph: CrystalGraph, scale: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        ctx.model, ctx.graph, ctx.scale = model, graph, scale
        return forces.clone(), stress.clone()

    @staticmethod
    def backward(ctx: Any, d_forces: Tensor, d_stress: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        dg = _backbone_jvp(ctx.model, ctx.graph, -d_forces, d_stress * ctx.scale)
        return dg, None, None, None, None, None


def _frame(model: CHGNet, graph: CrystalGraph, *, forces: bool, stress: bool
           ) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """Total energy (scalar, eV, with AtomRef), forces (N,3) eV/A and stress (3,3) GPa of one
    frame; differentiable w.r.t. the MLP and readout-norm parameters."""
    fn = make_features_fn(model, graph)
    lat = graph.lattice
    n = int(graph.atomic_number.shape[0])
    disp = torch.zeros((n, 3), dtype=lat.dtype, device=lat.device, requires_grad=forces)
    strain = torch.zeros((3, 3), dtype=lat.dtype, device=lat.device, requires_grad=stress)
    need = forces or stress
    with torch.enable_grad():
        h = fn(disp, strain)  # the backbone: only disp/strain carry autograd history
        hd = h.detach().requires_grad_(need)
        x = model.readout_norm(hd) if model.readout_norm is not None else hd
        e_site = model.mlp(x).sum()
        if not need:
            return e_site + _atomref_total(model, graph), None, None
        (g,) = torch.autograd.grad(e_site, hd, create_graph=True)
        leaves = [t for t, want in ((disp, forces), (strain, stress)) if want]
        vjp = torch.autograd.grad(h, leaves, grad_outputs=g.detach())
    del h  # the frame's backbone graph is gone here
    lat = lat.detach()  # chgnet's volume: a constant of the frame (no host sync on CUDA)
    scale = EV_PER_A3_TO_GPA / torch.dot(lat[0], torch.linalg.cross(lat[1], lat[2]))
    f_val = -vjp[0] if forces else lat.new_zeros((n, 3))
    s_val = vjp[-1] * scale if stress else lat.new_zeros((3, 3))
    f, s = _ForceStress.apply(g, f_val, s_val, model, graph, scale)
    return e_site + _atomref_total(model, graph), (f if forces else None), (s if stress else None)


def _atomref_total(model: CHGNet, graph: CrystalGraph) -> Tensor:
    """Total AtomRef energy (eV) exactly as chgnet adds it (x N when intensive)."""
    comp = model.composition_model([graph])[0]
    return comp * int(graph.atomic_number.shape[0]) if model.is_intensive else comp


def predict_lean(
    model: CHGNet, graphs: Sequence[CrystalGraph], *, forces: bool, stress: bool
) -> dict[str, Tensor | list[Tensor]]:
    """:func:`~kd_nnp.training.predict.predict_full`'s outputs by the lean path: ``'e'`` (B,)
    eV/atom, ``'f'`` list of (N_i,3) eV/A, ``'s'`` list of (3,3) GPa (chgnet's sign), equal to
    chgnet's to float32 rounding, with the same gradients w.r.t. the MLP (and a trainable
    readout norm). The backbone must be frozen (no parameter outside ``mlp`` /
    ``readout_norm`` may require grad: their gradients would be silently missing)."""
    if not graphs:
        raise ValueError("predict_lean needs at least one frame")
    trainable = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith(("mlp.", "readout_norm."))
    ]
    if trainable:
        raise ValueError(
            "the lean backend needs a frozen backbone (student.freeze=mlp or readout); "
            f"trainable backbone parameters: {trainable[:3]}{' ...' if len(trainable) > 3 else ''}"
        )
    energies, fs, ss = [], [], []
    for graph in graphs:
        e, f, s = _frame(model, graph, forces=forces, stress=stress)
        energies.append(e / int(graph.atomic_number.shape[0]))
        fs.append(f)
        ss.append(s)
    out: dict[str, Tensor | list[Tensor]] = {"e": torch.stack(energies)}
    if forces:
        out["f"] = fs
    if stress:
        out["s"] = ss
    return out

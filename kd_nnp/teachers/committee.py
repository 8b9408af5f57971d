"""Committee students: one CHGNet backbone, K trained readout MLPs ("heads").

The committee file (written by :func:`kd_nnp.training.committee.export_committee`, read here
so that the calculator registry can load it without importing the training stage) is a torch
file::

    {"model": <CHGNet.as_dict() of the committee MEAN>,
     "kd_nnp": {...provenance...},
     "kd_nnp_committee": {"format": 1, "head_dims": [64, 64, 64],
                          "heads": [mlp.state_dict() of head 0, ..., head K-1],
                          "head_seeds": [...], "bootstrap": bool}}

``model`` holds the backbone once. Its MLP is the exact mean of the K heads written as one
wider MLP (hidden widths K x 64: the heads' first layers stacked, their later layers block
diagonal, the output layer averaged), so ``CHGNet.from_file`` / ``student:PATH`` users that
know nothing of committees get the committee mean (energy, forces and stress of the mean,
since derivatives are linear). :func:`head_model` rebuilds any single head as a plain CHGNet.

:class:`CommitteeCalculator` runs the backbone ONCE per structure, applies the K heads to
its features, and takes the K heads' position and strain derivatives in one batched
backward pass (``torch.autograd.grad(..., is_grads_batched=True)``). Results: the mean
``energy``/``forces``/``stress`` and their standard deviations over the heads
(``energy_std``, ``forces_std``, ``stress_std``; population std, ``ddof=0``), plus the
per-head ``energies`` (K,), ``head_forces`` (K, N, 3) and ``stresses`` (K, 6) (eV, eV/A,
eV/A^3, ASE's Voigt convention).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from kd_nnp.teachers.base import StudentFileError

COMMITTEE_KEY = "kd_nnp_committee"
FORMAT = 1


def is_committee_blob(blob: Any) -> bool:
    return isinstance(blob, dict) and COMMITTEE_KEY in blob


def _linear_layers(mlp: Any) -> list[Any]:
    layers = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    if not layers:
        raise ValueError("the readout MLP has no linear layers")
    return layers


def mean_mlp_state(heads: Sequence[Any]) -> tuple[list[int], dict[str, Any]]:
    """``(hidden dims, state dict)`` of one CHGNet MLP computing the mean of ``heads``
    exactly (same activation, widths x K)."""
    k = len(heads)
    per_head = [_linear_layers(h) for h in heads]
    n_layers = len(per_head[0])
    if any(len(p) != n_layers for p in per_head):
        raise ValueError("committee heads differ in depth")
    names = [n for n, m in heads[0].named_modules() if isinstance(m, torch.nn.Linear)]
    state: dict[str, Any] = {}
    dims: list[int] = []
    for i, name in enumerate(names):
        ws = [p[i].weight.detach() for p in per_head]
        bs = [p[i].bias.detach() for p in per_head]
        if i == 0:
            w, b = torch.cat(ws, 0), torch.cat(bs, 0)
        elif i < n_layers - 1:
            w, b = torch.block_diag(*ws), torch.cat(bs, 0)
        else:
            w, b = torch.cat(ws, 1) / k, torch.stack(bs, 0).mean(0)
        if i < n_layers - 1:
            dims.append(int(w.shape[0]))
        state[f"{name}.weight"], state[f"{name}.bias"] = w.clone(), b.clone()
    return dims, state


def committee_blob(
    base: Any, heads: Sequence[Any], metadata: dict[str, Any], committee: dict[str, Any]
) -> dict[str, Any]:
    """The committee file's content: ``base`` (a CHGNet: its backbone is kept, its MLP is
    replaced by the mean of ``heads``), the heads' state dicts and ``committee`` info."""
    from chgnet.model import CHGNet

    if len(heads) < 2:
        raise ValueError(f"a committee needs at least 2 heads, got {len(heads)}")
    head_dims = list(base.model_args["mlp_hidden_dims"])
    dims, mlp_state = mean_mlp_state(heads)
    args = {**base.model_args, "mlp_hidden_dims": dims}
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("mlp.")}
    state.update({f"mlp.{k}": v for k, v in mlp_state.items()})
    mean = {"state_dict": state, "model_args": args}
    CHGNet.from_dict(mean)  # fails here (not at load time) if chgnet cannot rebuild it
    info = {
        "format": FORMAT,
        "head_dims": head_dims,
        "heads": [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in heads],
        **committee,
    }
    return {"model": mean, "kd_nnp": metadata, COMMITTEE_KEY: info}


def _check(blob: Any, where: str) -> dict[str, Any]:
    if not is_committee_blob(blob):
        raise StudentFileError(f"{where}: not a kd_nnp committee file (no {COMMITTEE_KEY})")
    info = blob[COMMITTEE_KEY]
    if info.get("format") != FORMAT:
        raise StudentFileError(f"{where}: committee format {info.get('format')!r}, expected 1")
    return info


def head_count(blob: dict[str, Any]) -> int:
    return len(_check(blob, "committee")["heads"])


def head_model(blob: dict[str, Any], head: int | str, where: str = "committee") -> Any:
    """A plain CHGNet of head ``head`` (0..K-1) or ``"mean"`` (the exact committee mean)."""
    import warnings

    from chgnet.model import CHGNet

    info = _check(blob, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if head == "mean":
            return CHGNet.from_dict(blob["model"]).to(torch.float32)
        k = len(info["heads"])
        if not (isinstance(head, int) and 0 <= head < k):
            raise StudentFileError(f"{where}: head must be 0..{k - 1} or 'mean', got {head!r}")
        args = {**blob["model"]["model_args"], "mlp_hidden_dims": list(info["head_dims"])}
        model = CHGNet(**args)
    state = {k: v for k, v in blob["model"]["state_dict"].items() if not k.startswith("mlp.")}
    state.update({f"mlp.{k}": v for k, v in info["heads"][head].items()})
    model.load_state_dict(state)
    return model.to(torch.float32)


class StackedHeads(torch.nn.Module):
    """K MLPs applied to the same input: ``(N, F) -> (N, K)``."""

    def __init__(self, heads: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x).reshape(-1, 1) for h in self.heads], dim=1)


def committee_model(blob: dict[str, Any], where: str = "committee") -> Any:
    """One CHGNet whose ``mlp`` returns the K heads' site energies side by side."""
    info = _check(blob, where)
    model = head_model(blob, 0, where)
    heads = []
    for state in info["heads"]:
        h = copy.deepcopy(model.mlp)
        h.load_state_dict(state)
        heads.append(h)
    model.mlp = StackedHeads(heads)
    return model


class CommitteeCalculator(Calculator):
    """Mean and spread of a committee from one backbone pass (see the module docstring).

    ``model``: :func:`committee_model` (a CHGNet whose ``mlp`` has K outputs).
    ``derivative_spread``: compute the K heads' forces and stresses at every call (the std
    results); False: the mean forces/stress from one backward pass of the mean energy (cost
    of a single student) plus the per-head energies, while ``forces_std``, ``stress_std`` and
    ``stresses`` are computed only when asked for (``calc.get_property("stress_std")``).
    Measured costs: docs/performance.md.
    """

    implemented_properties = (
        "energy", "free_energy", "forces", "stress",
        "energy_std", "forces_std", "stress_std", "energies", "stresses", "head_forces",
    )  # fmt: skip

    def __init__(self, model: Any, derivative_spread: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.derivative_spread = bool(derivative_spread)
        self.model = model.to("cpu").eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.graph_converter.set_isolated_atom_response("ignore")
        self.size = len(self.model.mlp.heads)

    @classmethod
    def from_file(cls, path: str | Path) -> CommitteeCalculator:
        blob = torch.load(Path(path), map_location="cpu", weights_only=False)
        return cls(committee_model(blob, str(path)))

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        from kd_nnp.teachers.calculators import graph_batch

        super().calculate(atoms, properties, system_changes)
        model, k = self.model, self.size
        n, bg, comp = graph_batch(model, self.atoms)
        pred = model._compute(bg, compute_force=False, compute_stress=False)
        scale = n if model.is_intensive else 1
        e_heads = pred["e"].reshape(k) * scale  # (K,) total energies without AtomRef
        want = set(properties or ()) & {"forces_std", "stress_std", "stresses", "head_forces"}
        spread = self.derivative_spread or bool(want)
        if spread:  # K position/strain gradients: one batched backward (K VJPs)
            d_pos, d_strain = torch.autograd.grad(
                e_heads,
                [bg.atom_positions[0], bg.strains[0]],
                grad_outputs=torch.eye(k, dtype=e_heads.dtype),
                is_grads_batched=True,
            )
        else:  # the mean only: one backward of the mean energy
            d_pos, d_strain = torch.autograd.grad(
                e_heads.mean(), [bg.atom_positions[0], bg.strains[0]]
            )
            d_pos, d_strain = d_pos[None], d_strain[None]
        volume = float(bg.volumes[0])
        energies = e_heads.detach().double().numpy() + comp * scale
        forces = -d_pos.detach().double().numpy()  # (K or 1, N, 3)
        s = d_strain.detach().double().numpy() / volume  # (K or 1, 3, 3), ASE sign
        stresses = np.stack([full_3x3_to_voigt_6_stress(0.5 * (x + x.T)) for x in s])
        e_mean = float(energies.mean())
        self.results = {
            "energy": e_mean,
            "free_energy": e_mean,
            "forces": forces.mean(0),
            "stress": stresses.mean(0),
            "energy_std": float(energies.std()),
            "energies": energies,
        }
        if spread:
            self.results.update(
                forces_std=forces.std(0),
                stress_std=stresses.std(0),
                stresses=stresses,
                head_forces=forces,
            )


def committee_disagreement(calc: CommitteeCalculator, frames: Sequence[Atoms]) -> list[dict]:
    """Per-frame disagreement of the heads (for active selection): energy std per atom
    (eV/atom), the largest and the mean per-atom force std norm (eV/A), the stress std's
    largest component (eV/A^3). One backbone pass per frame (also with
    ``derivative_spread=False``: the spreads are asked for)."""
    out = []
    for atoms in frames:
        a = atoms.copy()
        r = {k: calc.get_property(k, a) for k in ("energy_std", "forces_std", "stress_std")}
        f_std = np.linalg.norm(r["forces_std"], axis=1)
        out.append(
            {
                "energy_std_per_atom": float(r["energy_std"]) / len(a),
                "forces_std_max": float(f_std.max()),
                "forces_std_mean": float(f_std.mean()),
                "stress_std_max": float(np.abs(r["stress_std"]).max()),
            }
        )
    return out

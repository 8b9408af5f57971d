"""Calculators named by strings, so that worker processes can build them.

Specs:

- ``chgnet``: pretrained CHGNet 0.3.0 through :class:`InferenceCHGNetCalculator` (1 thread
  per process, no second-order autograd graph);
- ``chgnet-ase``: chgnet's own ``CHGNetCalculator`` (reference implementation, slower);
- ``student:PATH``: a CHGNet model file (``torch.save({"model": model.as_dict()})``), the
  format ``chgnet.model.CHGNet.from_file`` reads and ``kd-nnp export`` writes;
- ``teacher:NAME``: ``kd_nnp.teachers.registry.load_teacher(NAME).calculator`` (lazy import);
- ``module:factory`` (or ``module:factory:arg``): ``importlib.import_module(module).factory()``
  must return an ASE calculator (a single string argument may follow).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes


class InferenceCHGNetCalculator(Calculator):
    """CHGNet energy, forces and stress for inference only.

    chgnet's ``CHGNetCalculator`` runs ``CHGNet.forward`` which differentiates the energy
    with ``create_graph=True`` (so that a training loss can differentiate the forces again)
    and also predicts magnetic moments and crystal features. For relaxation none of that is
    needed: here the energy is computed once and forces and strain derivative come from one
    first-order ``torch.autograd.grad`` call. Results equal ``CHGNetCalculator``'s to float
    precision (tested).
    """

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, model: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from chgnet.model import CHGNet

        if model is None:
            model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
        self.model = model.to("cpu").eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.graph_converter.set_isolated_atom_response("ignore")

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        import torch
        from chgnet.model.model import BatchedGraph
        from pymatgen.io.ase import AseAtomsAdaptor

        super().calculate(atoms, properties, system_changes)
        model = self.model
        structure = AseAtomsAdaptor.get_structure(self.atoms)
        graph = model.graph_converter(structure)
        comp_energy = 0.0
        if model.composition_model is not None:
            comp_energy = float(model.composition_model([graph]).detach().reshape(-1)[0])
        bg = BatchedGraph.from_graphs(
            [graph],
            bond_basis_expansion=model.bond_basis_expansion,
            angle_basis_expansion=model.angle_basis_expansion,
            compute_stress=True,
        )
        pred = model._compute(bg, compute_force=False, compute_stress=False)
        n_atoms = len(structure)
        # _compute returns energy per atom for an intensive model (CHGNet 0.3.0 is intensive)
        energy = pred["e"].sum() * (n_atoms if model.is_intensive else 1)
        d_pos, d_strain = torch.autograd.grad(energy, [bg.atom_positions[0], bg.strains[0]])
        volume = float(bg.volumes[0])
        e_total = float(energy) + comp_energy * (n_atoms if model.is_intensive else 1)
        stress = d_strain.detach().numpy() / volume  # eV/A^3, ASE sign convention
        self.results = {
            "energy": e_total,
            "free_energy": e_total,
            "forces": -d_pos.detach().numpy().astype(np.float64),
            "stress": _full_to_voigt(0.5 * (stress + stress.T)),
        }


def _full_to_voigt(s: np.ndarray) -> np.ndarray:
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], dtype=np.float64)


def _load_chgnet_file(path: str) -> Any:
    from chgnet.model import CHGNet

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"student model file not found: {p}")
    return CHGNet.from_file(str(p))


def make_calculator(spec: str) -> Calculator:
    """Build the ASE calculator named by ``spec`` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "chgnet" and not rest:
        return InferenceCHGNetCalculator()
    if kind == "chgnet-ase" and not rest:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator

        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
        return CHGNetCalculator(model=model, use_device="cpu", on_isolated_atoms="ignore")
    if kind == "student":
        if not rest:
            raise ValueError("calculator spec 'student:PATH' needs a path")
        return InferenceCHGNetCalculator(model=_load_chgnet_file(rest))
    if kind == "teacher":
        if not rest:
            raise ValueError("calculator spec 'teacher:NAME' needs a teacher name")
        try:
            registry = importlib.import_module("kd_nnp.teachers.registry")
        except ImportError as exc:
            raise ImportError(
                f"calculator {spec!r}: kd_nnp.teachers.registry is not available ({exc})"
            ) from exc
        return registry.load_teacher(rest).calculator
    if rest:  # module:factory[:arg]
        factory_name, _, arg = rest.partition(":")
        try:
            module = importlib.import_module(kind)
        except ImportError as exc:
            raise ValueError(f"calculator spec {spec!r}: cannot import module {kind!r}") from exc
        factory = getattr(module, factory_name, None)
        if factory is None or not callable(factory):
            raise ValueError(f"calculator spec {spec!r}: {kind}.{factory_name} is not callable")
        calc = factory(arg) if arg else factory()
        if not isinstance(calc, Calculator) and not hasattr(calc, "get_potential_energy"):
            raise TypeError(
                f"calculator spec {spec!r}: factory returned {type(calc).__name__}, "
                "not an ASE calculator"
            )
        return calc
    raise ValueError(
        f"unknown calculator spec {spec!r}: use chgnet, chgnet-ase, student:PATH, "
        "teacher:NAME or module:factory"
    )


def method_label(spec: str) -> str:
    """Human label of a spec: ``CHGNet``, ``student(<file stem>)``, ``teacher(so3lr)``."""
    kind, _, rest = spec.partition(":")
    if kind == "chgnet" and not rest:
        return "CHGNet"
    if kind == "chgnet-ase" and not rest:
        return "CHGNet(ase)"
    if kind == "student":
        return f"student({Path(rest).stem})"
    if kind == "teacher":
        return f"teacher({rest})"
    if rest:
        return f"{kind.rsplit('.', 1)[-1]}.{rest.replace(':', '-')}"
    return spec


def gpa(stress_ev_a3: np.ndarray) -> np.ndarray:
    """Convert an ASE stress (eV/A^3) to GPa."""
    return np.asarray(stress_ev_a3) / units.GPa

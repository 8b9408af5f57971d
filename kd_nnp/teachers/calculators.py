"""One registry: a spec string -> an ASE calculator, and the one CHGNet loader.

Every stage that needs a calculator (pre-relaxing in ``kd-nnp data perturb``, labelling,
the relaxation / elastic benchmarks, exporting) builds it here, so worker processes can be
given a string. Specs:

- ``chgnet``: pretrained CHGNet 0.3.0 through :class:`InferenceCHGNetCalculator` (1 thread
  per process, no second-order autograd graph);
- ``student:PATH`` or ``student:PATH=LABEL``: a CHGNet model file
  (``torch.save({"model": model.as_dict()})``, what ``kd-nnp export`` and every training run
  write) or a kd_nnp Lightning checkpoint; ``=LABEL`` names it in benchmark tables; a
  committee file (``committee.size=K`` runs, :mod:`kd_nnp.teachers.committee`) gives the
  committee calculator (mean and standard deviations of the K heads);
- ``teacher:NAME``: a built-in teacher (:data:`TEACHERS`: ``so3lr``, ``gfn2``, ``chgnet_d3``,
  ``sevennet_d3``, ``chgnet``) or ``teacher:module:factory``, with its default settings;
- ``teachers:NAME=W,NAME=W,...``: the weighted mean of several teachers (weights normalised
  to sum 1; energy, forces and stress mixed alike, ASE's ``LinearCombinationCalculator``):
  the teacher a multi-teacher student (``data.label_set={so3lr: 1, chgnet_d3: 1}``) learns
  from, up to a per-element energy zero, so it is the baseline its distance is measured to;
- ``module:factory`` (or ``module:factory:arg``): ``importlib.import_module(module).factory()``
  must return an ASE calculator (a single string argument may follow).

:func:`check_spec` validates a spec cheaply (the file exists, the name is known, the module
imports) so a parent process fails before starting workers; :func:`make_calculator` raises
:class:`~kd_nnp.teachers.base.CalculatorSpecError` (a :class:`~kd_nnp.errors.KdNnpError`)
for a spec that names nothing. :func:`method_label` / :func:`unique_labels` give the labels
benchmarks use; two specs with one label are refused.

:func:`load_chgnet` is the only place a CHGNet is loaded (pretrained weights shipped in the
chgnet wheel, a model file, or a training checkpoint).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from kd_nnp.errors import KdNnpError
from kd_nnp.teachers.base import (
    PIP_EXTRA,
    CalculatorSpecError,
    GasPhase,
    StudentFileError,
    TeacherImportError,
)

SPEC_GRAMMAR = (
    "chgnet, student:PATH[=LABEL], teacher:NAME, teachers:NAME=W,NAME=W,... or module:factory[:arg]"
)


# ------------------------------------------------------------------ CHGNet loading
def student_from_checkpoint(ckpt_path: str | Path) -> Any:
    """Rebuild the CHGNet student from a kd_nnp Lightning checkpoint."""
    import torch

    blob = _torch_load(Path(ckpt_path))
    if not (isinstance(blob, dict) and "chgnet_model_args" in blob):
        raise StudentFileError(
            f"{ckpt_path}: not a kd_nnp training checkpoint (no chgnet_model_args)"
        )
    from chgnet.model import CHGNet

    state = {
        k[len("student.") :]: v for k, v in blob["state_dict"].items() if k.startswith("student.")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet(**blob["chgnet_model_args"])
    model.load_state_dict(state)
    return model.to(torch.float32)


def _torch_load(path: Path) -> Any:
    import torch

    if not path.is_file():
        raise StudentFileError(f"CHGNet model file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise StudentFileError(
            f"{path}: not a readable CHGNet model file ({type(exc).__name__}: {exc})"
        ) from exc


def read_model_file(path: str | Path) -> Any:
    """The content of a model file, checkpoint or committee file (StudentFileError if it
    is missing or unreadable)."""
    return _torch_load(Path(path).expanduser())


def load_chgnet(model_name: str = "0.3.0", path: str | Path | None = None) -> Any:
    """CHGNet in float32 on the CPU: the pretrained ``model_name`` (weights shipped in the
    chgnet wheel), or ``path``: a model file (``CHGNet.from_file`` format, what
    ``kd-nnp export`` writes) or a kd_nnp Lightning checkpoint."""
    import torch
    from chgnet.model import CHGNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path is None:
            model = CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)
        else:
            p = Path(path).expanduser()
            return _chgnet_from_blob(_torch_load(p), p)
    return model.to(torch.float32)


def _chgnet_from_blob(blob: Any, p: Path) -> Any:
    """The CHGNet of a loaded model file or checkpoint (a committee file: its exact mean)."""
    import torch
    from chgnet.model import CHGNet

    if isinstance(blob, dict) and "chgnet_model_args" in blob:
        return student_from_checkpoint(p)
    if not (isinstance(blob, dict) and "model" in blob):
        raise StudentFileError(
            f"{p}: neither a CHGNet model file (no 'model' entry) nor a kd_nnp checkpoint"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet.from_dict(blob["model"])
    return model.to(torch.float32)


def student_calculator(path: str | Path) -> Calculator:
    """The calculator of a student file: a committee file (:mod:`kd_nnp.teachers.committee`,
    detected by content) gives a :class:`~kd_nnp.teachers.committee.CommitteeCalculator`
    (mean and spread of the heads), a CHGNet model file or checkpoint an
    :class:`InferenceCHGNetCalculator`."""
    from kd_nnp.teachers.committee import CommitteeCalculator, committee_model, is_committee_blob

    p = Path(path).expanduser()
    blob = _torch_load(p)
    if is_committee_blob(blob):
        return CommitteeCalculator(committee_model(blob, str(p)))
    return InferenceCHGNetCalculator(model=_chgnet_from_blob(blob, p))


def batched_graph(model: Any, graphs: Sequence[Any]) -> Any:
    """chgnet's ``BatchedGraph`` of ``graphs`` for ``model._compute``, with position and
    strain gradients enabled (forces and stress are autograd derivatives of it)."""
    from chgnet.model.model import BatchedGraph

    return BatchedGraph.from_graphs(
        list(graphs),
        bond_basis_expansion=model.bond_basis_expansion,
        angle_basis_expansion=model.angle_basis_expansion,
        compute_stress=True,
    )


def graph_batch(model: Any, atoms: Atoms) -> tuple[int, Any, float]:
    """``(n_atoms, batched graph, AtomRef energy)`` of one structure for ``model._compute``:
    :func:`batched_graph` of chgnet's graph, and the composition model's energy (per atom for
    an intensive model; 0 without one). The committee calculator's preparation."""
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    graph = model.graph_converter(structure)
    comp_energy = 0.0
    if model.composition_model is not None:
        comp_energy = float(model.composition_model([graph]).detach().reshape(-1)[0])
    return len(structure), batched_graph(model, [graph]), comp_energy


def chgnet_results(model: Any, graphs: Sequence[Any], device: str = "cpu") -> list[dict[str, Any]]:
    """ASE results (``energy``, ``free_energy``, ``forces``, ``stress`` Voigt; eV, eV/A,
    eV/A^3 with positive = tensile) of ``graphs`` in one CHGNet forward: the energy once,
    forces and strain derivatives from one first-order autograd call. The computation of
    :class:`InferenceCHGNetCalculator` (one graph) and of the batched relaxation backend (many),
    so the two give bit-identical numbers."""
    import torch

    graphs = [g.to(device) for g in graphs]
    n_atoms = [int(g.atomic_number.shape[0]) for g in graphs]
    # _compute returns energy per atom for an intensive model (CHGNet 0.3.0 is intensive)
    scale = torch.tensor([float(n) if model.is_intensive else 1.0 for n in n_atoms], device=device)
    comp = torch.zeros(len(graphs), device=device)
    if model.composition_model is not None:
        comp = model.composition_model(graphs).detach().reshape(-1)
    bg = batched_graph(model, graphs)
    pred = model._compute(bg, compute_force=False, compute_stress=False)
    energies = pred["e"].reshape(-1) * scale  # eV per structure (the model's part)
    grads = torch.autograd.grad(energies.sum(), [*bg.atom_positions, *bg.strains])
    n = len(graphs)
    comp_e = comp.cpu().tolist()
    out = []
    for i in range(n):
        e_total = float(energies[i]) + comp_e[i] * float(scale[i])
        d_pos = grads[i].detach().cpu().numpy()
        stress = grads[n + i].detach().cpu().numpy() / float(bg.volumes[i])
        out.append(
            {
                "energy": e_total,
                "free_energy": e_total,
                "forces": -d_pos.astype(np.float64),
                "stress": full_3x3_to_voigt_6_stress(0.5 * (stress + stress.T)).astype(np.float64),
            }
        )
    return out


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
        if model is None:
            model = load_chgnet()
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
        from pymatgen.io.ase import AseAtomsAdaptor

        super().calculate(atoms, properties, system_changes)
        graph = self.model.graph_converter(AseAtomsAdaptor.get_structure(self.atoms))
        self.results = chgnet_results(self.model, [graph])[0]


# ------------------------------------------------------------------ built-in teachers
def _require(module: str, teacher: str, dist: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TeacherImportError(
            f"teacher {teacher!r} needs the package {dist!r} ({exc}); install it with "
            f"`{PIP_EXTRA}` or `pip install {dist}`"
        ) from exc


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def make_so3lr(compute_stress: bool = True, device: str = "cpu", **kw: Any) -> Any:
    mod = _require("so3krates_torch.calculator.so3", "so3lr", "so3krates-torch")
    if not compute_stress:
        raise KdNnpError("so3lr: kd_nnp needs stress; compute_stress must be True")
    return mod.SO3LRCalculator(compute_stress=True, device=device, **kw)


def make_gfn2(method: str = "GFN2-xTB", verbosity: int = 0, **kw: Any) -> Any:
    mod = _require("tblite.ase", "gfn2", "tblite")
    return mod.TBLite(method=method, verbosity=verbosity, **kw)


def _chgnet_calculator(model_name: str, device: str) -> Calculator:
    _require("chgnet", "chgnet", "chgnet")
    model = load_chgnet(model_name)
    if device == "cpu":
        return InferenceCHGNetCalculator(model)
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(model=model.to(device), use_device=device)


def make_chgnet(model_name: str = "0.3.0", device: str = "cpu") -> Any:
    return _chgnet_calculator(model_name, device)


def make_chgnet_d3(
    model_name: str = "0.3.0", device: str = "cpu", method: str = "PBE", damping: str = "d3bj"
) -> Any:
    from kd_nnp.teachers.dispersion import add_dispersion

    _require("dftd3.ase", "chgnet_d3", "dftd3")
    return add_dispersion(_chgnet_calculator(model_name, device), "d3", method, damping)


def _sevennet(model: str, modal: str | None, device: str, teacher: str) -> Any:
    mod = _require("sevenn.calculator", teacher, "sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor-product accelerator" on CPU
        return mod.SevenNetCalculator(model, device=device, modal=modal or None)


def make_sevennet_d3(
    model: str = "7net-0",
    modal: str = "",
    device: str = "cpu",
    method: str = "PBE",
    damping: str = "d3bj",
) -> Any:
    """SevenNet (``model``, pretrained weights shipped in the sevenn wheel: 7net-0, 7net-l3i5,
    7net-mf-0 with ``modal`` PBE or R2SCAN) + DFT-D3 with the parameters of ``method``."""
    from kd_nnp.teachers.dispersion import add_dispersion

    _require("dftd3.ase", "sevennet_d3", "dftd3")
    return add_dispersion(_sevennet(model, modal, device, "sevennet_d3"), "d3", method, damping)


@dataclass(frozen=True)
class TeacherSpec:
    factory: Callable[..., Any]
    dists: tuple[str, ...]
    modules: tuple[str, ...]  # importable modules it needs (checked cheaply by check_spec)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""


TEACHERS: dict[str, TeacherSpec] = {
    "so3lr": TeacherSpec(
        make_so3lr,
        ("so3krates-torch",),
        ("so3krates_torch",),
        {"compute_stress": True},
        "SO3LR (so3krates-torch), recommended default",
    ),
    "gfn2": TeacherSpec(
        make_gfn2, ("tblite",), ("tblite",), {"method": "GFN2-xTB"}, "GFN2-xTB (tblite)"
    ),
    "chgnet_d3": TeacherSpec(
        make_chgnet_d3,
        ("chgnet", "dftd3"),
        ("chgnet", "dftd3"),
        {"model_name": "0.3.0", "method": "PBE", "damping": "d3bj"},
        "CHGNet 0.3.0 + DFT-D3(BJ)",
    ),
    "chgnet": TeacherSpec(
        make_chgnet, ("chgnet",), ("chgnet",), {"model_name": "0.3.0"}, "CHGNet 0.3.0"
    ),
    "sevennet_d3": TeacherSpec(
        make_sevennet_d3,
        ("sevenn", "dftd3"),
        ("sevenn", "dftd3"),
        {"model": "7net-0", "modal": "", "method": "PBE", "damping": "d3bj"},
        "SevenNet-0 + DFT-D3(BJ, PBE parameters, three-body term on)",
    ),
}


def _signature_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """Keyword defaults of ``factory`` (so equal teachers get equal provenance hashes)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and isinstance(p.default, (str, int, float, bool, type(None)))
    }


def _import_factory(
    module_name: str, attr: str, what: str, error: type[KdNnpError] = CalculatorSpecError
) -> tuple[Any, Callable[..., Any]]:
    if not module_name or not attr:
        raise CalculatorSpecError(f"{what}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"{what}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise error(f"{what}: {module_name} has no callable {attr!r}")
    return module, factory


def resolve_teacher(
    name: str, settings: Mapping[str, Any] | None = None
) -> tuple[Callable[..., Any], dict[str, Any], str]:
    """``(factory, settings with defaults, version)`` of a teacher name or ``module:factory``."""
    settings = dict(settings or {})
    if name in TEACHERS:
        spec = TEACHERS[name]
        merged = {**_signature_defaults(spec.factory), **spec.defaults, **settings}
        version = "+".join(f"{d}=={_version(d)}" for d in spec.dists)
        return spec.factory, merged, version
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        module, factory = _import_factory(mod_name, attr, f"teacher {name!r}", TeacherImportError)
        top = mod_name.split(".")[0]
        version = getattr(module, "__version__", None) or _version(top)
        return factory, {**_signature_defaults(factory), **settings}, f"{top}=={version}"
    if name in ("", "???", "None"):
        raise CalculatorSpecError(
            "no teacher named: set one, e.g. `teacher=so3lr`, or for any ASE calculator "
            "`teacher=custom teacher.name=package.module:factory`"
        )
    raise CalculatorSpecError(
        f"unknown teacher {name!r}; built-in: {sorted(TEACHERS)}, or 'package.module:factory'"
    )


def _check_calculator(calc: Any, what: str) -> Any:
    if calc is None or not hasattr(calc, "get_property"):
        raise CalculatorSpecError(
            f"{what}: the factory returned {type(calc).__name__}, not an ASE calculator"
        )
    return calc


def build_teacher_calculator(name: str, settings: Mapping[str, Any] | None = None) -> Any:
    """The ASE calculator of teacher ``name`` (built-in or ``module:factory``)."""
    factory, merged, _ = resolve_teacher(name, settings)
    return _check_calculator(factory(**merged), f"teacher {name!r}")


def parse_teacher_mixture(rest: str) -> dict[str, float]:
    """``NAME=W,NAME=W,...`` of a ``teachers:`` spec as ``{name: weight / sum}``; weights
    must be finite and >= 0 with a positive sum, each name given once, weight-0 names are
    dropped."""
    spec = f"teachers:{rest}"
    weights: dict[str, float] = {}
    for part in [p.strip() for p in rest.split(",")] if rest.strip() else []:
        name, eq, w = part.rpartition("=")
        name = name.strip()
        if not eq or not name:
            raise CalculatorSpecError(
                f"calculator spec {spec!r}: {part!r} is not NAME=WEIGHT "
                "(e.g. teachers:so3lr=1,chgnet_d3=1)"
            )
        try:
            weight = float(w)
        except ValueError:
            raise CalculatorSpecError(
                f"calculator spec {spec!r}: weight of {name!r} is not a number: {w!r}"
            ) from None
        if not np.isfinite(weight) or weight < 0:
            raise CalculatorSpecError(
                f"calculator spec {spec!r}: weight of {name!r} must be finite and >= 0"
            )
        if name in weights:
            raise CalculatorSpecError(f"calculator spec {spec!r}: {name!r} is given twice")
        weights[name] = weight
    total = sum(weights.values())
    if not weights or total <= 0:
        raise CalculatorSpecError(
            f"calculator spec {spec!r} needs teachers with a positive weight "
            "(e.g. teachers:so3lr=1,chgnet_d3=1)"
        )
    return {n: w / total for n, w in weights.items() if w > 0}


def build_teacher_mixture(weights: Mapping[str, float]) -> Any:
    """The weighted mean (``weights`` summing to 1) of the teachers named by ``weights``."""
    from ase.calculators.mixing import LinearCombinationCalculator

    calcs = [build_teacher_calculator(name) for name in weights]
    if len(calcs) == 1:
        return calcs[0]
    return LinearCombinationCalculator(calcs, list(weights.values()))


# ------------------------------------------------------------------ gas phase
def student_clearance() -> float:
    """The student's interaction range (A): pretrained CHGNet's atom-graph cutoff (its bond
    graph, 3 A, lies inside it). A gas-phase box with at least this image clearance has no
    graph edge across its faces, so the student sees the molecule alone."""
    return float(_student_cutoff())


@functools.lru_cache(maxsize=1)
def _student_cutoff() -> float:
    return float(load_chgnet().graph_converter.atom_graph_cutoff)


def calculator_cutoff(calc: Any) -> tuple[float, str] | None:
    """The distance beyond which a calculator sees no atom, read from the calculator object:
    CHGNet-type models (``model.graph_converter.atom_graph_cutoff``), SO3LR-type
    (``r_max_lr``, else ``r_max``); a sum of calculators (``.calcs``, or ASE's
    ``.mixer.calcs``): the largest of its parts' known cutoffs. None when unknown (e.g.
    tblite's Ewald sums, D3's own real-space cutoffs). The one reading of a calculator's range:
    :func:`gas_phase` (how a teacher computes a molecule) and the lattice-energy isolation
    check both use it."""
    parts = getattr(calc, "calcs", None) or getattr(getattr(calc, "mixer", None), "calcs", None)
    if parts:
        found = [c for c in (calculator_cutoff(p) for p in parts) if c is not None]
        return max(found) if found else None
    conv = getattr(getattr(calc, "model", None), "graph_converter", None)
    if conv is not None and getattr(conv, "atom_graph_cutoff", None) is not None:
        return float(conv.atom_graph_cutoff), "atom-graph cutoff"
    for attr in ("r_max_lr", "r_max"):
        value = getattr(calc, attr, None)
        if isinstance(value, int | float) and value > 0:
            return float(value), f"{attr}"
    return None


# teachers computed without periodic boundary conditions for an isolated molecule
NON_PERIODIC_GAS = ("gfn2", "chgnet_d3", "sevennet_d3")


def gas_phase(name: str, calculator: Any) -> GasPhase:
    """How teacher ``name`` (built as ``calculator``) computes an isolated molecule, from the
    calculator itself (measured on benzene in docs/data.md):

    - ``so3lr``: periodic box; exact when the clearance is at least its long-range cutoff
      ``r_max_lr`` (12 A; electrostatics and dispersion are summed in real space up to it,
      its message passing reaches ``r_max`` = 4.5 A per layer through edges that do not
      cross such a box): energies equal to the non-periodic ones to float32 precision;
    - ``chgnet``: periodic box, exact beyond its atom-graph cutoff (6 A);
    - ``gfn2``: without periodic boundary conditions (periodic GFN2-xTB sums Ewald
      electrostatics, which no box removes exactly);
    - ``chgnet_d3`` and ``sevennet_d3``: without periodic boundary conditions (D3's two-body cutoff is 60
      bohr = 31.75 A; CHGNet and SevenNet give the same energy with or without periodicity in a
      box: benzene, 20 A of vacuum, to 4e-6 eV);
    - ``module:factory``: periodic box, its range read by :func:`calculator_cutoff` when the
      calculator exposes one, else unknown (``clearance`` None).
    """
    if name in NON_PERIODIC_GAS:
        return GasPhase(False, 0.0, "computed without periodic boundary conditions")
    if name == "so3lr" and not float(getattr(calculator, "r_max_lr", None) or 0.0) > 0:
        raise KdNnpError("so3lr: the calculator has no long-range cutoff r_max_lr")
    found = calculator_cutoff(calculator)
    if found is None:
        return GasPhase(True, None, "interaction range unknown")
    return GasPhase(True, found[0], f"{name}: {found[1]} {found[0]:g} A")


# ------------------------------------------------------------------ specs
def _student_parts(rest: str) -> tuple[str, str | None]:
    """``PATH[=LABEL]`` -> (path, label or None). A path that exists is taken whole; else the
    first ``=`` after which the part before is an existing file splits it (a label may hold
    ``=``: ``run/student.pt=lr=0.01``)."""
    if not rest:
        raise CalculatorSpecError("calculator spec 'student:PATH' needs a path")
    if "=" in rest and not Path(rest).expanduser().is_file():
        for i, ch in enumerate(rest):
            if ch == "=" and rest[i + 1 :] and Path(rest[:i]).expanduser().is_file():
                return rest[:i], rest[i + 1 :]
        # no existing file before any '=': 'runs/x/student.pt=soft' (not made yet) names it;
        # 'ckpts/epoch=3-step=90.ckpt' is a path
        path, _, label = rest.rpartition("=")
        if path and label and not set("/.") & set(label):
            return path, label
    return rest, None


def make_calculator(spec: str) -> Calculator:
    """Build the ASE calculator named by ``spec`` (see the module docstring)."""
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind == "chgnet" and not rest:
        return InferenceCHGNetCalculator()
    if kind == "student":
        path, _ = _student_parts(rest)
        return student_calculator(path)
    if kind == "teacher":
        if not rest:
            raise CalculatorSpecError("calculator spec 'teacher:NAME' needs a teacher name")
        return build_teacher_calculator(rest)
    if kind == "teachers":
        return build_teacher_mixture(parse_teacher_mixture(rest))
    if rest:  # module:factory[:arg]
        factory_name, _, arg = rest.partition(":")
        _, factory = _import_factory(kind, factory_name, f"calculator spec {spec!r}")
        calc = factory(arg) if arg else factory()
        return _check_calculator(calc, f"calculator spec {spec!r}")
    raise CalculatorSpecError(f"unknown calculator spec {spec!r}: use {SPEC_GRAMMAR}")


def check_spec(spec: str) -> None:
    """Validate ``spec`` cheaply, without building anything heavy: the student file exists,
    the teacher name is known and its packages are installed, the module imports and has the
    factory. Raises :class:`~kd_nnp.teachers.base.CalculatorSpecError` (or
    :class:`~kd_nnp.teachers.base.TeacherImportError`) saying what is wrong."""
    import importlib.util

    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind == "chgnet" and not rest:
        if importlib.util.find_spec("chgnet") is None:
            raise TeacherImportError("calculator 'chgnet' needs the package chgnet")
        return
    if kind == "student":
        path, _ = _student_parts(rest)
        p = Path(path).expanduser()
        if not p.is_file():
            raise StudentFileError(f"calculator spec {spec!r}: no model file at {p}")
        return
    if kind == "teacher":
        if not rest:
            raise CalculatorSpecError("calculator spec 'teacher:NAME' needs a teacher name")
        if rest in TEACHERS:
            for mod, dist in zip(TEACHERS[rest].modules, TEACHERS[rest].dists):
                if importlib.util.find_spec(mod) is None:
                    raise TeacherImportError(
                        f"teacher {rest!r} needs the package {dist!r}; install it with "
                        f"`{PIP_EXTRA}` or `pip install {dist}`"
                    )
            return
        resolve_teacher(rest)  # module:factory imports; an unknown name raises
        return
    if kind == "teachers":
        for name in parse_teacher_mixture(rest):
            check_spec(f"teacher:{name}")
        return
    if rest:
        _import_factory(kind, rest.partition(":")[0], f"calculator spec {spec!r}")
        return
    raise CalculatorSpecError(f"unknown calculator spec {spec!r}: use {SPEC_GRAMMAR}")


def method_label(spec: str) -> str:
    """Label of a spec in tables: ``CHGNet``, ``teacher(so3lr)``, the ``LABEL`` of
    ``student:PATH=LABEL``, else ``student(<file stem>)`` -- or ``student(<run folder>)``
    for the ``student.pt`` / ``last.ckpt`` every training run writes (the file name says
    nothing there)."""
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind == "chgnet" and not rest:
        return "CHGNet"
    if kind == "student":
        path, label = _student_parts(rest)
        if label:
            return label
        p = Path(path)
        if p.stem in ("student", "last"):
            run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
            return f"student({run.name or p.stem})"
        return f"student({p.stem})"
    if kind == "teacher":
        return f"teacher({rest})"
    if kind == "teachers":
        return f"teachers({rest})"
    if rest:
        return f"{kind.rsplit('.', 1)[-1]}.{rest.replace(':', '-')}"
    return spec


def spec_fingerprint(spec: str) -> str:
    """What a calculator spec computes: for ``student:PATH[=LABEL]`` the spec plus the model
    file's content hash, so a student retrained at the same path never reuses the old
    student's results (benchmark records are keyed by it)."""
    import hashlib

    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind == "student" and rest:
        path = Path(_student_parts(rest)[0]).expanduser()
        if path.is_file():
            return f"{spec}#{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return spec


def unique_labels(specs: Iterable[str]) -> dict[str, str]:
    """``{spec: method_label(spec)}`` for ``specs``; two different specs with one label
    raise :class:`~kd_nnp.errors.KdNnpError` naming both (results would merge)."""
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for spec in map(str, specs):
        if spec in out:
            continue
        label = method_label(spec)
        if label in owner:
            raise KdNnpError(
                f"calculators {owner[label]!r} and {spec!r} both get the label {label!r}; "
                "name them, e.g. 'student:PATH=LABEL'"
            )
        owner[label] = spec
        out[spec] = label
    return out

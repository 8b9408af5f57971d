"""Teacher registry: a name (or ``module:factory``) -> a checked ASE calculator.

Built-in names (heavy packages are imported only when chosen):

- ``so3lr``: SO3LR from ``so3krates-torch`` (weights ship in the wheel), the default;
- ``gfn2``: GFN2-xTB from ``tblite`` (periodic; slow);
- ``chgnet_d3``: CHGNet 0.3.0 + DFT-D3(BJ, PBE) from ``dftd3``, summed (ASE SumCalculator);
- ``chgnet``: plain pretrained CHGNet 0.3.0 (a cheap baseline);
- ``package.module:factory``: ``factory(**settings)`` must return an ASE calculator.

``load_teacher(name, check=True, **settings)`` runs :func:`kd_nnp.teachers.check.check_teacher`
on a tiny crystal and refuses a teacher whose forces or stress disagree with finite
differences (:class:`TeacherCheckError`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.data.store import Labels
from kd_nnp.errors import KdNnpError
from kd_nnp.utils.provenance import stable_hash

PIP_EXTRA = "pip install 'kd_nnp[teachers]'"


class TeacherImportError(KdNnpError, ImportError):
    """The package a teacher needs is not installed (message names the pip extra)."""


class TeacherCheckError(KdNnpError, RuntimeError):
    """A teacher failed its load-time check (message gives the reason)."""


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


# ------------------------------------------------------------------ factories
def make_so3lr(compute_stress: bool = True, device: str = "cpu", **kw: Any) -> Any:
    mod = _require("so3krates_torch.calculator.so3", "so3lr", "so3krates-torch")
    if not compute_stress:
        raise ValueError("so3lr: kd_nnp needs stress; compute_stress must be True")
    return mod.SO3LRCalculator(compute_stress=True, device=device, **kw)


def make_gfn2(method: str = "GFN2-xTB", verbosity: int = 0, **kw: Any) -> Any:
    mod = _require("tblite.ase", "gfn2", "tblite")
    return mod.TBLite(method=method, verbosity=verbosity, **kw)


def _chgnet_calc(model_name: str, device: str) -> Any:
    _require("chgnet", "chgnet", "chgnet")
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    model = CHGNet.load(model_name=model_name, use_device=device, verbose=False)
    return CHGNetCalculator(model=model, use_device=device)


def make_chgnet(model_name: str = "0.3.0", device: str = "cpu") -> Any:
    return _chgnet_calc(model_name, device)


def make_chgnet_d3(
    model_name: str = "0.3.0", device: str = "cpu", method: str = "PBE", damping: str = "d3bj"
) -> Any:
    from ase.calculators.mixing import SumCalculator

    d3 = _require("dftd3.ase", "chgnet_d3", "dftd3")
    return SumCalculator(
        [_chgnet_calc(model_name, device), d3.DFTD3(method=method, damping=damping)]
    )


@dataclass(frozen=True)
class TeacherSpec:
    factory: Callable[..., Any]
    dists: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""


TEACHERS: dict[str, TeacherSpec] = {
    "so3lr": TeacherSpec(
        make_so3lr,
        ("so3krates-torch",),
        {"compute_stress": True},
        "SO3LR (so3krates-torch), recommended default",
    ),
    "gfn2": TeacherSpec(make_gfn2, ("tblite",), {"method": "GFN2-xTB"}, "GFN2-xTB (tblite)"),
    "chgnet_d3": TeacherSpec(
        make_chgnet_d3,
        ("chgnet", "dftd3"),
        {"model_name": "0.3.0", "method": "PBE", "damping": "d3bj"},
        "CHGNet 0.3.0 + DFT-D3(BJ)",
    ),
    "chgnet": TeacherSpec(make_chgnet, ("chgnet",), {"model_name": "0.3.0"}, "CHGNet 0.3.0"),
}


# ------------------------------------------------------------------ teacher
@dataclass
class Teacher:
    """A named ASE calculator with its settings, version and load-time check report."""

    name: str
    settings: dict[str, Any]
    version: str
    calculator: Any
    check_report: dict[str, Any] | None = None

    def provenance(self) -> dict[str, Any]:
        core = {"name": self.name, "version": self.version, "settings": self.settings}
        return dict(core, hash=stable_hash(core), check=self.check_report)

    def compute(self, atoms: Atoms) -> Labels:
        """Energy (eV), forces (eV/A), stress (ASE Voigt, eV/A^3) of ``atoms``."""
        a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        a.calc = self.calculator
        energy = float(a.get_potential_energy())
        forces = np.array(a.get_forces(), dtype=float)
        stress = np.array(a.get_stress(voigt=True), dtype=float)
        return Labels(energy, forces, stress)


def _plain(obj: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain dicts/lists."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def _signature_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """Keyword defaults of ``factory`` (so equal teachers get equal provenance hashes)."""
    import inspect

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


def _resolve(name: str, settings: dict[str, Any]) -> tuple[Callable[..., Any], dict, str]:
    if name in TEACHERS:
        spec = TEACHERS[name]
        merged = {**_signature_defaults(spec.factory), **spec.defaults, **settings}
        version = "+".join(f"{d}=={_version(d)}" for d in spec.dists)
        return spec.factory, merged, version
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise TeacherImportError(
                f"teacher {name!r}: cannot import {mod_name!r} ({exc})"
            ) from exc
        factory = getattr(mod, attr, None)
        if not callable(factory):
            raise TeacherImportError(f"teacher {name!r}: {mod_name} has no callable {attr!r}")
        top = mod_name.split(".")[0]
        version = getattr(mod, "__version__", None) or _version(top)
        return factory, {**_signature_defaults(factory), **settings}, f"{top}=={version}"
    raise KeyError(
        f"unknown teacher {name!r}; built-in: {sorted(TEACHERS)}, or 'package.module:factory'"
    )


def load_teacher(name: str, check: bool = True, **settings: Any) -> Teacher:
    """Build the teacher ``name`` with ``settings``; check it on a tiny crystal by default."""
    settings = _plain({k: v for k, v in settings.items() if not k.startswith("_")})
    factory, merged, version = _resolve(str(name), settings)
    calc = factory(**merged)
    if calc is None or not hasattr(calc, "get_property"):
        raise TeacherCheckError(
            f"teacher {name!r}: factory returned {calc!r}, not an ASE calculator"
        )
    teacher = Teacher(str(name), merged, version, calc)
    if check:
        from kd_nnp.teachers.check import check_teacher

        teacher.check_report = check_teacher(teacher)
    return teacher

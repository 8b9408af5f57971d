"""Teacher loading: a name (or ``module:factory``) -> a checked :class:`Teacher`.

The calculator itself comes from the one registry, :mod:`kd_nnp.teachers.calculators`
(built-in names: ``so3lr`` (default), ``gfn2``, ``chgnet_d3``, ``chgnet``; or
``package.module:factory`` whose ``factory(**settings)`` returns an ASE calculator). This
module adds what labelling needs: settings with their defaults, the package version, a
provenance hash, and the load-time check.

``load_teacher(name, check=True, **settings)`` runs :func:`kd_nnp.teachers.check.check_teacher`
on a tiny crystal and refuses a teacher whose forces or stress disagree with finite
differences (:class:`~kd_nnp.teachers.base.TeacherCheckError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kd_nnp.teachers.base import Teacher
from kd_nnp.teachers.calculators import _check_calculator, gas_phase, resolve_teacher
from kd_nnp.teachers.check import check_teacher


def _plain(obj: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain dicts/lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def load_teacher(name: str, check: bool = True, **settings: Any) -> Teacher:
    """Build the teacher ``name`` with ``settings``; check it on a tiny crystal by default."""
    settings = _plain({k: v for k, v in settings.items() if not k.startswith("_")})
    factory, merged, version = resolve_teacher(str(name), settings)
    calc = _check_calculator(factory(**merged), f"teacher {name!r}")
    teacher = Teacher(str(name), merged, version, calc, gas=gas_phase(str(name), calc))
    if check:
        teacher.check_report = check_teacher(teacher)
    return teacher

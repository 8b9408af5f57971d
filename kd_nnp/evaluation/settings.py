"""Evaluation settings, each spelled once (see :mod:`kd_nnp.utils.settings`).

- :class:`RelaxSettings`: the relaxation protocol (``kd-nnp evaluate relax`` options,
  ``conf/demo.yaml: demo.relax``, the flat relaxation keys of ``conf/evaluate/relax.yaml``);
- :class:`ElasticSettings`: the elastic protocol (strains and thresholds);
- :class:`ElasticJobSettings`: the ``evaluate.elastic`` block (which structures, workers,
  baselines + an :class:`ElasticSettings`), also the options of ``evaluate elastic|table2``;
- :class:`ForgettingSettings`: the forgetting check (``kd-nnp evaluate forgetting`` options);
- :class:`EvalJobSettings`: the per-job ``evaluate`` block a training run reads (which
  crystals, workers, baselines + a :class:`RelaxSettings` + optional elastic block + the
  forgetting flag);
- :class:`LatticeSettings`: the gas-phase side of the lattice-energy protocol (box clearance,
  reference method); the crystal side is a :class:`RelaxSettings`;
- :class:`BakeoffSettings`: which teachers the bake-off ranks (``kd-nnp evaluate teachers``).

The YAML blocks are flat (``evaluate.fmax``, ``evaluate.elastic.ion_fmax``):
:meth:`EvalJobSettings.from_config` / :meth:`ElasticJobSettings.from_config` lift the protocol
keys into the nested dataclass and refuse unknown keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kd_nnp.errors import SettingsError
from kd_nnp.utils.settings import as_dict, from_mapping, register_schema, to_plain

RELAX_BACKENDS = ("ase", "batched")


@dataclass(frozen=True)
class RelaxSettings:
    """How a crystal is relaxed (LBFGS on a FrechetCellFilter) and what is measured."""

    fmax: float = field(default=0.03, metadata={"help": "force threshold, eV/A"})
    max_steps: int = field(default=2000, metadata={"help": "max LBFGS steps in total"})
    stress_tol_gpa: float = field(
        default=0.01, metadata={"help": "residual stress threshold max|sigma_ij|, GPa"}
    )
    exp_cell_factor: float | None = field(
        default=None,
        metadata={
            "help": "FrechetCellFilter exp_cell_factor (unset = 1: cell forces are V*sigma in "
            "eV, not ASE's default N_atoms)"
        },
    )
    rmsd: bool = field(default=True, metadata={"help": "RMSD15 overlay of 15-molecule clusters"})
    backend: str = field(
        default="ase",
        metadata={
            "help": "ase: one crystal per worker process; batched: the crystals of a "
            "CHGNet-based calculator (chgnet, student:PATH) share one CHGNet forward per step "
            "(same LBFGS protocol, kd_nnp.evaluation.batched)"
        },
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "backend=batched: crystals relaxed together (one forward per step)"},
    )
    device: str = field(
        default="cpu", metadata={"help": "backend=batched: torch device (cpu, cuda, cuda:N)"}
    )
    volume_std_threshold_pct: float = field(
        default=1.0,
        metadata={
            "help": "committee students: flag crystals whose volume uncertainty (std over the "
            "heads, in percent) exceeds this"
        },
    )

    def check(self) -> None:
        if self.volume_std_threshold_pct <= 0:
            raise SettingsError(
                f"relaxation: volume_std_threshold_pct={self.volume_std_threshold_pct} must be > 0"
            )
        if self.fmax <= 0 or self.max_steps < 1 or self.stress_tol_gpa <= 0:
            raise SettingsError(
                f"relaxation: fmax, stress_tol_gpa must be > 0 and max_steps >= 1 ({self})"
            )
        if self.exp_cell_factor is not None and self.exp_cell_factor <= 0:
            raise SettingsError(f"relaxation: exp_cell_factor={self.exp_cell_factor} must be > 0")
        if self.backend not in RELAX_BACKENDS:
            raise SettingsError(
                f"relaxation: backend={self.backend!r}; use one of {', '.join(RELAX_BACKENDS)}"
            )
        if self.batch_size < 1:
            raise SettingsError(f"relaxation: batch_size={self.batch_size} must be >= 1")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise SettingsError(f"relaxation: device={self.device!r}; use cpu, cuda or cuda:N")
        if self.backend == "ase" and self.device != "cpu":
            raise SettingsError(
                f"relaxation: device={self.device!r} needs backend=batched (the ase backend "
                "relaxes on the CPU, one crystal per worker process)"
            )

    def protocol(self) -> dict[str, Any]:
        """What changes a relaxed structure: the key results on disk are reused under. The
        batched backend adds itself and its device (float differences); ``batch_size`` is
        left out like ``workers``: each crystal's trajectory does not depend on which others
        share its forward (tested). The ase backend adds nothing, so results on disk from
        before the backend setting existed are still reused."""
        out: dict[str, Any] = {
            "fmax": self.fmax,
            "max_steps": self.max_steps,
            "stress_tol_gpa": self.stress_tol_gpa,
            "exp_cell_factor": self.exp_cell_factor,
        }
        if self.backend != "ase":
            out.update(backend=self.backend, device=self.device)
        return out


@dataclass(frozen=True)
class ElasticSettings:
    """Relaxation + finite-strain stiffness fit of one structure. The relaxation thresholds are
    :class:`RelaxSettings`' fields (their defaults are taken from there, not spelled again);
    :meth:`relax` hands them over."""

    strains: tuple[float, ...] = field(
        default=(0.005, 0.01), metadata={"help": "strain magnitudes (+/- each, normal and shear)"}
    )
    fmax: float = field(
        default=RelaxSettings.fmax, metadata={"help": "force threshold of the relaxation, eV/A"}
    )
    ion_fmax: float = field(
        default=0.01,
        metadata={"help": "force threshold of the fixed-cell ion relaxations at each strain"},
    )
    max_steps: int = field(
        default=RelaxSettings.max_steps, metadata={"help": "max LBFGS steps of the relaxation"}
    )
    stress_tol_gpa: float = field(
        default=RelaxSettings.stress_tol_gpa,
        metadata={"help": "residual stress threshold of the relaxation, GPa"},
    )

    def check(self) -> None:
        if not self.strains or any(s <= 0 for s in self.strains):
            raise SettingsError(f"elastic: strains {self.strains} must be positive magnitudes")
        if self.fmax <= 0 or self.ion_fmax <= 0 or self.stress_tol_gpa <= 0:
            raise SettingsError(f"elastic: thresholds must be > 0 ({self})")

    def protocol(self) -> dict[str, Any]:
        return as_dict(self)

    def relax(self) -> RelaxSettings:
        """The relaxation before the strains."""
        return RelaxSettings(
            fmax=self.fmax, max_steps=self.max_steps, stress_tol_gpa=self.stress_tol_gpa
        )


@dataclass(frozen=True)
class ElasticJobSettings:
    """Which structures of the shared elastic set, how many workers, which baselines."""

    shared_dir: str | None = field(
        default=None,
        metadata={"help": "shared data folder (unset: $KD_NNP_SHARED_DATA or ../shared/data)"},
    )
    compounds: tuple[str, ...] | None = field(
        default=None, metadata={"help": "comma-separated compound names (unset: all 15)"}
    )
    all_files: bool = field(
        default=False,
        metadata={"help": "every structure file of a compound, not only the first"},
    )
    max_atoms: int | None = field(default=None, metadata={"help": "skip larger structures"})
    workers: int = field(default=1, metadata={"help": "worker processes (1 thread each)"})
    baselines: dict[str, str] | None = field(
        default=None,
        metadata={"help": "{label: calculator spec} (unset: the relaxation baselines)"},
    )
    baseline_dir: str | None = field(
        default=None, metadata={"help": "baseline cache (unset: baseline_root/elastic-<hash>)"}
    )
    protocol: ElasticSettings = field(default_factory=ElasticSettings)

    @classmethod
    def from_config(
        cls, values: Mapping[str, Any] | None, *, where: str = "evaluate.elastic"
    ) -> ElasticJobSettings:
        return _lift(cls, "protocol", ElasticSettings, values, where)


@dataclass(frozen=True)
class ForgettingSettings:
    """The forgetting check (:mod:`kd_nnp.evaluation.forgetting`): how far a student moved from
    pretrained CHGNet on inorganic and hybrid structures outside its training domain."""

    prototypes: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "comma-separated built-in structure names (unset: all)"},
    )
    n_perturbed: int = field(
        default=2, metadata={"help": "strained + rattled copies per built-in structure"}
    )
    strain: float = field(
        default=0.03, metadata={"help": "max |strain component| of the perturbed copies"}
    )
    rattle_std: float = field(
        default=0.05, metadata={"help": "position noise of the perturbed copies, A"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the perturbed copies"})
    mptrj: bool = field(
        default=True,
        metadata={"help": "add the shared MPtrj frames (DFT labels) when the shared data exists"},
    )
    shared_dir: str | None = field(
        default=None,
        metadata={"help": "shared data folder (unset: $KD_NNP_SHARED_DATA or ../shared/data)"},
    )
    relax: bool = field(
        default=True,
        metadata={"help": "relax each unperturbed built-in structure (relaxed-volume change)"},
    )
    fmax: float = field(default=0.05, metadata={"help": "force threshold of the relaxations"})
    max_steps: int = field(default=150, metadata={"help": "LBFGS step budget of each relaxation"})
    stress_tol_gpa: float = field(
        default=0.05, metadata={"help": "residual stress threshold of the relaxations, GPa"}
    )

    def check(self) -> None:
        if self.n_perturbed < 0 or self.strain < 0 or self.rattle_std < 0:
            raise SettingsError(
                f"forgetting: n_perturbed, strain, rattle_std must be >= 0 ({self})"
            )
        self.relax_settings().check()

    def protocol(self) -> dict[str, Any]:
        return as_dict(self)

    def relax_settings(self) -> RelaxSettings:
        return RelaxSettings(
            fmax=self.fmax,
            max_steps=self.max_steps,
            stress_tol_gpa=self.stress_tol_gpa,
            rmsd=False,
        )


@dataclass(frozen=True)
class EvalJobSettings:
    """The per-job ``evaluate`` block: relax held-out crystals with the trained student."""

    dataset: str = field(
        default="pyxtal:test",
        metadata={"help": "pyxtal:test, pyxtal:mech, a CIF folder or cifs:DIR"},
    )
    split_from: str | None = field(
        default=None,
        metadata={"help": "a crystals.json ({'eval': [ids], ...}): relax its 'eval' ids"},
    )
    codes: tuple[str, ...] | None = field(
        default=None, metadata={"help": "comma-separated crystal ids / CSD codes"}
    )
    limit: int | None = field(default=None, metadata={"help": "first N crystals (after filters)"})
    max_atoms: int | None = field(default=None, metadata={"help": "skip crystals with more atoms"})
    workers: int = field(default=1, metadata={"help": "worker processes (1 thread each)"})
    references: bool = field(
        default=False,
        metadata={"help": "add test.db's stored DFTB/ANI/GULP/CHARMM cells as reference rows"},
    )
    progress: bool = field(default=False, metadata={"help": "progress bar"})
    baselines: dict[str, str] | None = field(
        default=None, metadata={"help": "{label: calculator spec} relaxed once in a shared cache"}
    )
    baseline_root: str = field(
        default="outputs/baselines", metadata={"help": "folder of the shared baseline caches"}
    )
    baseline_dir: str | None = field(
        default=None, metadata={"help": "baseline cache (unset: baseline_root/relax-<hash>)"}
    )
    elastic: ElasticJobSettings | None = field(
        default=None, metadata={"help": "the Table 2 block (conf/evaluate/table2.yaml)"}
    )
    forgetting: ForgettingSettings | None = field(
        default_factory=ForgettingSettings,
        metadata={
            "help": "forgetting check vs pretrained CHGNet on inorganic/hybrid structures: "
            "true (ForgettingSettings defaults), false / null (off) or a mapping of "
            "ForgettingSettings keys; the reference is cached in baseline_root"
        },
    )
    relax: RelaxSettings = field(default_factory=RelaxSettings)

    def check(self) -> None:
        if self.codes and self.split_from:
            raise SettingsError("evaluate: give codes or split_from, not both")

    @classmethod
    def from_config(
        cls, values: Mapping[str, Any] | None, *, where: str = "evaluate"
    ) -> EvalJobSettings:
        plain = dict(to_plain(values) or {})
        if "forgetting" in plain:
            plain["forgetting"] = forgetting_from_config(plain["forgetting"], f"{where}.forgetting")
        if plain.get("elastic") is not None:
            plain["elastic"] = ElasticJobSettings.from_config(
                plain["elastic"], where=f"{where}.elastic"
            )
        return _lift(cls, "relax", RelaxSettings, plain, where)


def forgetting_from_config(value: Any, where: str) -> ForgettingSettings | None:
    """``evaluate.forgetting``: true -> the defaults, false / null -> off, a mapping -> its keys."""
    value = to_plain(value)
    if value is None or value is False:
        return None
    if value is True:
        return ForgettingSettings()
    if isinstance(value, ForgettingSettings):
        return value
    if isinstance(value, Mapping):
        return from_mapping(ForgettingSettings, value, where=where)
    raise SettingsError(
        f"{where}={value!r}: use true, false or a mapping of ForgettingSettings keys"
    )


@dataclass(frozen=True)
class LatticeSettings:
    """The gas-phase side of ``kd-nnp evaluate lattice`` (the crystal relaxation and the gas
    relaxation's force threshold and step limit are a :class:`RelaxSettings`)."""

    clearance: float = field(
        default=30.0,
        metadata={
            "help": "gas-phase box: minimum distance (A) from any atom to any atom of a periodic "
            "image, for any orientation of the molecule; refused below CHGNet's atom-graph "
            "cutoff (see docs/evaluation.md for the convergence table)"
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "method label the others are compared with (MAE, signed mean); unset: the "
            "first teacher:NAME calculator, else none"
        },
    )

    def check(self) -> None:
        if not self.clearance > 0:
            raise SettingsError(f"lattice: clearance={self.clearance} must be > 0 A")

    def protocol(self) -> dict[str, Any]:
        """What changes a gas-phase energy (the key gas records are reused under)."""
        return {"clearance": self.clearance}


@dataclass(frozen=True)
class BakeoffSettings:
    """Which calculators the teacher bake-off (``kd-nnp evaluate teachers``) relaxes and what
    its ranking adds; the crystals and the relaxation protocol are the relaxation
    benchmark's (:class:`EvalJobSettings` selection, :class:`RelaxSettings`)."""

    teachers: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "comma-separated teacher names (built-in or module:factory); unset: every "
            "built-in teacher but plain chgnet"
        },
    )
    chgnet: bool = field(default=True, metadata={"help": "pretrained CHGNet as the baseline row"})
    skip_missing: bool = field(
        default=False,
        metadata={
            "help": "leave out teachers whose packages are not installed (listed in the "
            "ranking); unset: a missing package is an error"
        },
    )
    lattice: bool = field(
        default=False,
        metadata={
            "help": "add lattice energies (kd-nnp evaluate lattice on the same relaxations, "
            "into OUT/lattice): per method mean and MAE / signed mean vs --reference"
        },
    )
    n_boot: int = field(
        default=2000, metadata={"help": "bootstrap resamples of the volume MAE interval"}
    )

    def check(self) -> None:
        if self.teachers is not None and not self.teachers:
            raise SettingsError("bake-off: teachers is empty; unset it for every built-in one")
        if self.n_boot < 100:
            raise SettingsError(f"bake-off: n_boot={self.n_boot} must be >= 100")


def _lift(cls: type, nested: str, inner: type, values: Any, where: str) -> Any:
    """``cls`` from a flat mapping: the keys of ``inner`` go into the field ``nested``."""
    plain = dict(to_plain(values) or {})
    inner_names = {f.name for f in dataclasses.fields(inner)}
    outer_names = {f.name for f in dataclasses.fields(cls)} - {nested}
    unknown = sorted(set(plain) - inner_names - outer_names)
    if unknown:
        raise SettingsError(
            f"{where}: unknown key(s) {unknown}; allowed: {sorted(inner_names | outer_names)}"
        )
    inner_obj = from_mapping(inner, {k: plain.pop(k) for k in list(plain) if k in inner_names},
                             where=where)  # fmt: skip
    nested_objs = {k: plain.pop(k) for k in list(plain) if dataclasses.is_dataclass(plain[k])}
    obj = from_mapping(cls, plain, where=where)
    return dataclasses.replace(obj, **{nested: inner_obj}, **nested_objs)


register_schema("schema/evaluate", "relax_settings", RelaxSettings)
register_schema("schema/evaluate", "elastic_settings", ElasticSettings)
register_schema("schema/evaluate", "elastic_job", ElasticJobSettings)
register_schema("schema/evaluate", "job", EvalJobSettings)
register_schema("schema/evaluate", "forgetting", ForgettingSettings)
register_schema("schema/evaluate", "lattice_settings", LatticeSettings)
register_schema("schema/evaluate", "bakeoff", BakeoffSettings)

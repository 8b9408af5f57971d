"""Isolated molecules of a store's crystals as gas-phase training frames (``kd-nnp data molecules``).

A student trained on crystals only learns nothing that ties a crystal's energy to the energy
of its molecules, i.e. nothing about lattice energies (``E_crystal / Z - E_molecule``). This
source adds, *into the same store*, the molecules of every crystal:

- one crystal per group: the group's reference geometry, the first frame in store order
  with ``perturbation=parent`` (the teacher-pre-relaxed parent of ``kd-nnp data perturb``
  and the demo) or the final (teacher-relaxed) frame of a packing of ``data generate``, else
  the first unperturbed frame (no ``parent_id`` / ``perturbation`` /
  ``step`` info: experimental crystals of ``data pyxtal`` / ``data files``, MPtrj);
- each kind of molecule of it (:func:`kd_nnp.data.molecules.distinct_molecules`: whole,
  unwrapped, ``count`` molecules of the kind in the cell), centred in a cubic periodic box
  (:func:`kd_nnp.data.molecules.isolate`) whose image clearance is at least the teacher's
  and the student's interaction range (checked on every written frame);
- relaxed by the teacher (positions, fixed box, FIRE/LBFGS, ``relax_steps``) and kept with
  ``n_perturbed`` rattled copies; a molecule whose bond graph changes in the relaxation is
  rejected and counted, never written;
- labelled by the teacher as it goes (energy, forces, stress; label set named after the
  teacher, like ``data generate``), as the teacher computes gas-phase frames
  (:func:`gas_labels`: in the box, or without periodic boundary conditions).

Frame ids ``<crystal frame id>/mol<k>/relaxed`` and ``.../mol<k>/rattle<j>``; group id = the
crystal's group id (splits keep a crystal and its molecules together); info ``phase=gas``,
``mol_key``, ``count_in_cell``, ``crystal_frame``, ``mol_index``, ``gas_frame``
(relaxed | rattle), ``relax_steps``, ``relax_converged``, ``relax_fmax``, ``image_clearance``.

Training fits one per-element soft-energy reference over all training frames of the store,
crystals and molecules alike (:mod:`kd_nnp.training.reference`), so the student is taught the
teacher's ``E_crystal / Z - E_molecule`` rather than two unrelated offsets.

Resumable: the frames of one molecule are written in one SQLite transaction, then their
labels, then a line in ``STORE/molecules.jsonl``; a molecule with frames or a rejection line
is done; frames without labels (a kill between the two transactions) get single-point labels
at the next start. The store keeps one recipe (``STORE/molecules.json``: teacher, label set,
settings, clearance): another one is refused.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.data.molecules import (
    distinct_molecules,
    graph_key,
    image_clearance,
    isolate,
    isolated_stress,
    one_molecule,
)
from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError, check_recipe
from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.utils.jsonl import append_jsonl, read_jsonl
from kd_nnp.utils.settings import as_dict

log = logging.getLogger(__name__)

SOURCE = "molecules"
RECIPE_FILE = "molecules.json"
LOG_FILE = "molecules.jsonl"
#: added to the required clearance when ``clearance`` is 0 (auto): relaxation and rattling
#: change the molecule's extent in its fixed box
AUTO_MARGIN = 2.0


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class MoleculesSettings:
    """How the gas-phase molecules of a store's crystals are made (one definition for the
    Python API, the ``kd-nnp data molecules`` options and the recipe a store remembers)."""

    relax_steps: int = field(
        default=200, metadata=_h("teacher relaxation step budget (positions, fixed box)")
    )
    fmax: float = field(default=0.02, metadata=_h("relaxation force limit (eV/A)"))
    optimizer: str = field(default="FIRE", metadata=_h("FIRE | LBFGS"))
    n_perturbed: int = field(default=3, metadata=_h("rattled copies of each relaxed molecule"))
    rattle_std: float = field(default=0.05, metadata=_h("rattle standard deviation (A)"))
    clearance: float = field(
        default=0.0,
        metadata=_h(
            "image clearance of the box (A); 0: the teacher's and the student's interaction "
            f"range + {AUTO_MARGIN:g} A; smaller than that range is refused"
        ),
    )
    seed: int = field(default=0, metadata=_h("random seed (per molecule: seed, crystal, k)"))

    def check(self) -> None:
        if self.optimizer not in ("FIRE", "LBFGS"):
            raise SettingsError(f"optimizer must be FIRE or LBFGS, not {self.optimizer!r}")
        for name in ("relax_steps", "n_perturbed"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rattle_std < 0 or self.clearance < 0 or self.fmax <= 0:
            raise SettingsError(
                f"rattle_std ({self.rattle_std}) and clearance ({self.clearance}) must be >= 0, "
                f"fmax ({self.fmax}) > 0"
            )


def box_clearance(
    settings: MoleculesSettings, teacher_clearance: float | None, student_clearance: float
) -> tuple[float, float]:
    """``(required, used)`` image clearance (A): ``required`` = the larger interaction range
    of teacher and student, ``used`` = ``settings.clearance`` or ``required`` + margin. An
    unknown teacher range (``None``) needs an explicit ``clearance``; one below the
    requirement is refused (:class:`~kd_nnp.errors.SettingsError`)."""
    if teacher_clearance is None:
        if settings.clearance <= 0:
            raise SettingsError(
                "the teacher's interaction range is unknown (a module:factory calculator): give "
                "--clearance A, at least its cutoff (and the student's "
                f"{student_clearance:g} A)"
            )
        teacher_clearance = settings.clearance
    required = max(float(teacher_clearance), float(student_clearance))
    if settings.clearance <= 0:
        return required, required + AUTO_MARGIN
    if settings.clearance < required:
        raise SettingsError(
            f"clearance {settings.clearance:g} A is smaller than the interaction range "
            f"{required:g} A (teacher {teacher_clearance:g} A, student {student_clearance:g} A): "
            "images of the molecule would interact"
        )
    return required, float(settings.clearance)


# ---------------------------------------------------------------- labels
def gas_labels(
    atoms: Atoms,
    calc: Any,
    periodic: bool,
    clearance: float | None = None,
    name: str = "calculator",
) -> Labels:
    """Energy, forces and stress of an isolated molecule in its box ``atoms``.

    ``periodic``: computed in the periodic box, refused (:class:`~kd_nnp.errors.KdNnpError`)
    when the box's image clearance is below ``clearance`` (the calculator's range; None:
    unchecked). Else computed without periodic boundary conditions, the stress being the
    virial of the forces over the box volume (:func:`~kd_nnp.data.molecules.isolated_stress`),
    what a periodic calculator gives in a box whose images do not interact."""
    if periodic:
        if clearance is not None:
            c = image_clearance(atoms)
            if c < clearance:
                raise KdNnpError(
                    f"{name}: the gas-phase box has an image clearance of {c:.2f} A, below its "
                    f"interaction range {clearance:g} A; rebuild the molecules with a larger "
                    "--clearance (kd-nnp data molecules)"
                )
        a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
        a.calc = calc
        return Labels(a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=True))
    a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=False)
    a.calc = calc
    energy = float(a.get_potential_energy())
    forces = np.array(a.get_forces(), dtype=float)
    return Labels(energy, forces, isolated_stress(a.positions, forces, atoms.get_volume()))


# ---------------------------------------------------------------- crystals
def _rank(fr: Frame) -> int | None:
    if fr.info.get("phase") == "gas":
        return None
    if fr.info.get("perturbation") == "parent":
        return 0
    if fr.source == "generate" and fr.info.get("final"):
        return 0  # a generated crystal relaxed by the teacher (the final frame of a packing)
    if not {"parent_id", "perturbation", "step"} & set(fr.info):
        return 1
    return None


def crystal_frames(frames: Iterable[Frame], skipped: Counter | None = None) -> list[Frame]:
    """The reference crystal of each group (see the module doc), in order of first frame."""
    best: dict[str, tuple[int, int, Frame]] = {}
    groups: dict[str, None] = {}  # in order of first frame
    for i, fr in enumerate(frames):
        if fr.info.get("phase") == "gas":
            continue
        groups.setdefault(fr.group_id, None)
        r = _rank(fr)
        if r is not None and (fr.group_id not in best or r < best[fr.group_id][0]):
            best[fr.group_id] = (r, i, fr)
    n_without = sum(1 for g in groups if g not in best)
    if skipped is not None and n_without:
        skipped["group without a reference crystal"] += n_without
    return [best[g][2] for g in groups if g in best]


# ---------------------------------------------------------------- one molecule
@dataclass
class MoleculeJob:
    crystal_frame: str
    group_id: str
    k: int
    key: str
    count: int
    symbols: list[str]
    positions: np.ndarray


def _rng(seed: int, crystal_frame: str, k: int) -> np.random.Generator:
    h = int(hashlib.sha256(crystal_frame.encode()).hexdigest()[:12], 16)
    return np.random.default_rng([int(seed), h, int(k)])


def _recentre(atoms: Atoms) -> Atoms:
    pos = atoms.positions
    mid = (pos.max(axis=0) + pos.min(axis=0)) / 2.0
    out = atoms.copy()
    out.positions = pos - mid + atoms.cell.array.sum(axis=0) / 2.0
    return out


def make_molecule_frames(
    job: MoleculeJob,
    settings: MoleculesSettings,
    calc: Any,
    *,
    periodic: bool,
    required: float,
    clearance: float,
) -> dict[str, Any]:
    """Relax one isolated molecule and rattle it: ``{"status": "ok", "frames": [(suffix,
    atoms, labels, info)], ...}`` or ``{"status": "rejected", "cause", "detail"}``."""
    from ase.optimize import FIRE, LBFGS

    s = settings
    t0 = time.perf_counter()

    def rejected(cause: str, detail: str) -> dict[str, Any]:
        return dict(status="rejected", cause=cause, detail=detail, seconds=time.perf_counter() - t0)

    box = isolate(job.symbols, job.positions, clearance)
    a = box.copy()
    a.pbc = periodic
    a.calc = calc
    try:
        opt = (FIRE if s.optimizer == "FIRE" else LBFGS)(a, logfile=None)
        converged = bool(opt.run(fmax=s.fmax, steps=s.relax_steps)) if s.relax_steps else False
        steps = int(opt.nsteps)
    except Exception as exc:  # the teacher failed on this molecule
        return rejected("relaxation failed", f"{type(exc).__name__}: {exc}")
    relaxed = _recentre(Atoms(box.numbers, a.positions, cell=box.cell, pbc=True))
    syms = relaxed.get_chemical_symbols()
    if not one_molecule(syms, relaxed.positions) or graph_key(syms, relaxed.positions) != job.key:
        return rejected("molecule changed in relaxation", f"bond graph of {job.key} changed")
    rng = _rng(s.seed, job.crystal_frame, job.k)
    base = {
        "phase": "gas",
        "mol_key": job.key,
        "count_in_cell": int(job.count),
        "crystal_frame": job.crystal_frame,
        "mol_index": int(job.k),
        "relax_steps": steps,
        "relax_converged": converged,
        "gas_periodic": bool(periodic),
    }
    geoms: list[tuple[str, Atoms, dict[str, Any]]] = [("relaxed", relaxed, {})]
    for j in range(s.n_perturbed):
        r = relaxed.copy()
        r.positions = r.positions + rng.normal(scale=s.rattle_std, size=r.positions.shape)
        geoms.append((f"rattle{j}", r, {"rattle_std": s.rattle_std}))
    out = []
    for suffix, g, extra in geoms:
        c = image_clearance(g)
        if c < required:
            return rejected(
                "box too small", f"{suffix}: image clearance {c:.2f} A < {required:g} A"
            )
        try:
            lab = gas_labels(g, calc, periodic)
        except Exception as exc:
            return rejected("labelling failed", f"{suffix}: {type(exc).__name__}: {exc}")
        info = dict(base, gas_frame=suffix.rstrip("0123456789"), image_clearance=c, **extra)
        if suffix == "relaxed":
            info["relax_fmax"] = float(np.linalg.norm(lab.forces, axis=1).max())
        out.append((suffix, g, lab, info))
    fmax = out[0][3]["relax_fmax"]
    return dict(
        status="ok",
        frames=out,
        steps=steps,
        converged=converged,
        fmax=fmax,
        seconds=time.perf_counter() - t0,
    )


_WORKER_CALC: Any = None


def _init_worker_calculator(builder: Any) -> None:
    global _WORKER_CALC
    _WORKER_CALC = builder()


def _task(item: tuple[MoleculeJob, MoleculesSettings, bool, float, float]) -> dict[str, Any]:
    job, s, periodic, required, clearance = item
    return make_molecule_frames(
        job, s, _WORKER_CALC, periodic=periodic, required=required, clearance=clearance
    )


# ---------------------------------------------------------------- store
@dataclass
class MoleculesReport:
    """What one run did."""

    n_crystals: int = 0
    n_molecules: int = 0
    done_before: int = 0
    accepted: int = 0
    frames: int = 0
    not_converged: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    relabelled: int = 0
    clearance: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        skip = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.n_crystals} crystals, {self.n_molecules} molecules: {self.accepted} written "
            f"({self.frames} frames, {self.not_converged} not converged within the step budget), "
            f"{self.done_before} done before; rejected: {rej}; skipped: {skip}; box clearance "
            f"{self.clearance:g} A; {self.seconds:.0f} s"
        )


def build_molecules_store(
    store: str,
    settings: MoleculesSettings | None = None,
    *,
    calculator: Any,
    calculator_name: str,
    label_name: str,
    periodic: bool,
    teacher_clearance: float | None,
    student_clearance: float,
    provenance: dict[str, Any] | None = None,
    codes: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> MoleculesReport:
    """Add the gas-phase molecules of the crystals of ``store`` to it (see the module doc).

    ``calculator``: the teacher's ASE calculator, or a zero-argument builder (needed for
    ``workers`` > 1, called once per worker); ``periodic`` / ``teacher_clearance``: how it
    computes isolated molecules (:func:`kd_nnp.teachers.calculators.gas_phase`);
    ``student_clearance``: the student's range (CHGNet's atom-graph cutoff). ``label_name``:
    the label set (the one ``kd-nnp label`` writes for this teacher, so crystals and molecules
    share it); ``provenance`` (the teacher's) must match the set's earlier provenance.
    ``codes``: only crystals whose frame id or group id is listed; ``limit``: the first N."""
    s = settings or MoleculesSettings()
    s.check()
    if calculator is None:
        raise SettingsError("molecules needs a calculator (the teacher that relaxes them)")
    required, clearance = box_clearance(s, teacher_clearance, student_clearance)
    t0 = time.perf_counter()
    report = MoleculesReport(clearance=clearance)
    dest = FrameStore(store)
    frames = list(dest.iter_frames())
    crystals = crystal_frames(frames, report.skipped)
    if codes:
        wanted = set(codes)
        crystals = [c for c in crystals if c.frame_id in wanted or c.group_id in wanted]
        found = {c.frame_id for c in crystals} | {c.group_id for c in crystals}
        missing = sorted(wanted - found)
        if missing:
            raise StoreError(f"{dest.root}: no reference crystal for {missing}")
    if limit is not None:
        crystals = crystals[: int(limit)]
    if not crystals:
        raise StoreError(f"{dest.root}: no crystal to take molecules from ({dict(report.skipped)})")
    report.n_crystals = len(crystals)
    recipe: dict[str, Any] = {
        "calculator": calculator_name,
        "label_set": label_name,
        "gas_periodic": bool(periodic),
        "clearance": clearance,
        "settings": as_dict(s),
    }
    if provenance and provenance.get("hash"):
        recipe["calculator_hash"] = provenance["hash"]
    check_recipe(dest, RECIPE_FILE, recipe, "molecules", own_store=False)
    jobs: list[MoleculeJob] = []
    for cr in crystals:
        try:
            kinds = distinct_molecules(cr.atoms)
        except ValueError as exc:
            report.skipped["not molecular"] += 1
            log.info("molecules: %s skipped (%s)", cr.frame_id, exc)
            continue
        lone = sorted({m.symbols[0] for m in kinds if len(m.symbols) == 1})
        if lone:
            # a salt with monatomic ions (a hydrochloride's Cl-): an isolated ion is no gas-phase
            # reference for a charge-neutral potential, and CHGNet has no graph for a lone atom
            # (training stopped on such a frame); the crystal's other molecules are skipped too,
            # since they are ions as well
            report.skipped["salt with monatomic ions"] += 1
            log.info("molecules: %s skipped (monatomic ions %s)", cr.frame_id, lone)
            continue
        for k, m in enumerate(kinds):
            jobs.append(
                MoleculeJob(cr.frame_id, cr.group_id, k, m.key, m.count, m.symbols, m.positions)
            )
    report.n_molecules = len(jobs)
    labels = dest.labels(label_name, create=True)
    log_path = dest.root / LOG_FILE
    with labels.writer_lock():
        labels.set_provenance(
            dict(
                labels.provenance, **(provenance or {"name": calculator_name}), label_set=label_name
            )
        )
        calc = calculator

        def built() -> Any:
            nonlocal calc
            if callable(calc) and not hasattr(calc, "get_property"):
                calc = calc()
            return calc

        done: set[tuple[str, int]] = set()
        for rec in read_jsonl(log_path):
            done.add((rec["crystal_frame"], int(rec["mol_index"])))
        gas = [f for f in frames if f.info.get("phase") == "gas"]
        for f in gas:
            done.add((f.info["crystal_frame"], int(f.info["mol_index"])))
        status = labels.status()
        unlabelled = [f for f in gas if status.get(f.frame_id) != "ok"]
        if unlabelled:  # killed between the frames' and the labels' transactions
            results = []
            for f in unlabelled:
                t1 = time.perf_counter()
                lab = gas_labels(f.atoms, built(), periodic, required if periodic else None)
                results.append((f, lab, None, time.perf_counter() - t1))
            labels.write(results)
            report.relabelled = len(results)
        todo = [j for j in jobs if (j.crystal_frame, j.k) not in done]
        report.done_before = len(jobs) - len(todo)

        def write(job: MoleculeJob, res: dict[str, Any]) -> None:
            rec: dict[str, Any] = {
                "crystal_frame": job.crystal_frame,
                "mol_index": job.k,
                "mol_key": job.key,
            }
            if res["status"] == "ok":
                out, results = [], []
                for suffix, a, lab, info in res["frames"]:
                    fid = f"{job.crystal_frame}/mol{job.k}/{suffix}"
                    fr = Frame(fid, a, job.group_id, SOURCE, None, info)
                    out.append(fr)
                    results.append((fr, lab, None, 0.0))
                dest.add_frames(out, batch_size=len(out) + 1)  # one transaction
                labels.write(results)
                rec.update({x: res[x] for x in ("steps", "converged", "fmax")})
                rec.update(status="ok", frames=len(out))
                report.accepted += 1
                report.frames += len(out)
                report.not_converged += not res["converged"]
            else:
                rec.update(status="rejected", cause=res["cause"], detail=res["detail"])
                report.rejected[res["cause"]] += 1
            rec["seconds"] = round(res["seconds"], 3)
            append_jsonl(log_path, rec)
            log.info(
                "molecules %s mol%d (%s): %s in %.1f s",
                job.crystal_frame, job.k, job.key,
                rec["status"] if rec["status"] == "ok" else f"rejected ({rec['detail']})",
                rec["seconds"],
            )  # fmt: skip

        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                write(
                    job,
                    make_molecule_frames(
                        job, s, built(), periodic=periodic, required=required, clearance=clearance
                    ),
                )
        else:
            from kd_nnp.utils.parallel import run_tasks

            if not callable(calculator) or hasattr(calculator, "get_property"):
                raise SettingsError(
                    "workers > 1 need a calculator builder (a picklable zero-argument callable "
                    "each worker calls), not a calculator instance"
                )
            by_key = {(j.crystal_frame, j.k): j for j in todo}
            items = [((j.crystal_frame, j.k), (j, s, periodic, required, clearance)) for j in todo]
            for tr in run_tasks(
                _task,
                items,
                n_workers=workers,
                initializer=_init_worker_calculator,
                initargs=(calculator,),
                desc="molecules",
                progress=progress,
            ):
                if not tr.ok:
                    raise KdNnpError(f"molecules {tr.key}: worker failed: {tr.error}")
                write(by_key[tr.key], tr.value)
    report.seconds = time.perf_counter() - t0
    return report


def read_molecules_log(store: str) -> list[dict[str, Any]]:
    """Every molecule record of a store (``STORE/molecules.jsonl``)."""
    return read_jsonl(FrameStore(store).root / LOG_FILE)

"""Lattice energies (``kd-nnp evaluate lattice``): relaxed crystal vs relaxed gas-phase molecules.

Protocol, per (calculator, crystal):

1. the crystal is relaxed with the relaxation benchmark's protocol
   (:func:`kd_nnp.evaluation.protocol.relax_structure`, the :class:`RelaxSettings` given; the
   jobs *are* the relaxation benchmark's, in ``relax_dir``, so a folder already holding them,
   e.g. the demo's, is reused and no crystal is relaxed twice);
2. each symmetry-distinct kind of molecule (:func:`kd_nnp.data.molecules.distinct_molecules`,
   taken whole from the *experimental* cell) is placed alone in a cubic periodic box whose edge
   is the molecule's largest interatomic distance plus ``clearance``, so that every atom stays
   at least ``clearance`` from every image atom however the molecule turns, and its positions
   are relaxed at fixed box (same ``fmax`` and step limit);
3. ``E_latt = (E_crystal - sum_k count_k E_gas_k) / sum_k count_k`` in kJ/mol per molecule
   (:func:`lattice_energy`); for a one-component crystal ``count = Z`` and this is
   ``E_crystal / Z - E_gas``. ``E_crystal`` is the *relaxed* crystal's energy.

A crystal relaxation that failed (error, not converged, broken or merged molecules, blown-up
volume), a gas relaxation that did not converge, or a gas molecule that fell apart or changed
its bond graph gives a record with ``status == "error"`` and the reason, never a number.

Isolation: a clearance below the cutoff of any calculator of the run whose cutoff is known
(CHGNet's and a student's atom graph, ``model.graph_converter.atom_graph_cutoff``; SO3LR's
long-range cutoff ``r_max_lr``) is refused, and never below pretrained CHGNet's atom-graph
cutoff; the default and its measured convergence are in docs/evaluation.md. Built-in
teachers that compute molecules without periodic boundary conditions (GFN2-xTB, the + D3/D4
teachers: :func:`kd_nnp.teachers.calculators.gas_phase`, the rule ``kd-nnp label`` and
``kd-nnp data molecules`` follow) relax the molecule with ``pbc=False`` (record ``periodic``).

Outputs in ``out_dir``: ``relax/`` (the crystal relaxations and their report, unless
``relax_dir`` points elsewhere), ``gas.jsonl`` (gas relaxations, resumable like every runner
file), ``lattice.jsonl`` (one record per method and crystal, rewritten from the two),
``table.md``, ``table.csv`` (per crystal, one column per method, plus the spread),
``summary.csv``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms, units

from kd_nnp.data.molecules import (
    CrystalMolecule,
    distinct_molecules,
    graph_key,
    image_clearance,
    isolate,
    one_molecule,
)
from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.protocol import relax_structure
from kd_nnp.evaluation.runner import (
    Structure,
    atoms_from_dict,
    get_calc,
    is_done,
    label_calculators,
    latest,
    run_jobs,
)
from kd_nnp.evaluation.settings import LatticeSettings, RelaxSettings
from kd_nnp.evaluation.structures import Crystal
from kd_nnp.teachers.calculators import calculator_cutoff, spec_fingerprint, student_clearance
from kd_nnp.utils import markdown
from kd_nnp.utils.jsonl import read_jsonl

log = logging.getLogger(__name__)

#: 1 eV per molecule in kJ/mol (96.485332...)
EV_TO_KJ_MOL = units.mol / units.kJ
GAS_FILE = "gas.jsonl"
RESULTS_FILE = "lattice.jsonl"


# ------------------------------------------------------------------ the arithmetic
def lattice_energy(
    e_crystal: float,
    crystal: Atoms | Sequence[CrystalMolecule],
    e_gas: Mapping[str, float],
) -> float:
    """Lattice energy in kJ/mol per molecule.

    ``E_latt = (E_crystal - sum_k count_k E_gas_k) / sum_k count_k`` where ``k`` runs over the
    distinct kinds of molecule of the cell (:func:`distinct_molecules` of ``crystal``, or the
    kinds given), ``count_k`` is how many molecules of kind ``k`` the cell holds and
    ``E_gas_k`` (eV) is the isolated molecule's energy, keyed by its graph key. For a
    one-component crystal this is ``E_crystal / Z - E_gas``; for a co-crystal or solvate the
    energy per molecule averaged over all molecules of the cell. ``e_crystal`` in eV per cell.
    """
    kinds = distinct_molecules(crystal) if isinstance(crystal, Atoms) else list(crystal)
    missing = [k.key for k in kinds if k.key not in e_gas]
    if missing:
        raise KeyError(f"no gas-phase energy for molecule(s) {missing}; have {sorted(e_gas)}")
    n = sum(k.count for k in kinds)
    if n < 1:
        raise ValueError("a crystal without molecules has no lattice energy")
    e_mol = sum(k.count * float(e_gas[k.key]) for k in kinds)
    return (float(e_crystal) - e_mol) / n * EV_TO_KJ_MOL


# ------------------------------------------------------------------ isolation
def molecule_diameter(positions: np.ndarray) -> float:
    """Largest interatomic distance of a molecule (0 for one atom)."""
    p = np.asarray(positions, dtype=float)
    if len(p) < 2:
        return 0.0
    return float(np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)).max())


def gas_box(symbols: Sequence[str], positions: np.ndarray, clearance: float) -> Atoms:
    """The molecule alone in a cubic periodic box of edge ``diameter + clearance``: any atom is
    at least ``clearance`` from any image atom in every orientation of the molecule (an image
    atom is at least ``edge - diameter`` away), so a relaxation that turns it keeps the
    isolation. Built with :func:`kd_nnp.data.molecules.isolate` (ValueError if not one
    molecule)."""
    pos = np.asarray(positions, dtype=float)
    extent = float(np.ptp(pos, axis=0).max()) if len(pos) else 0.0
    return isolate(symbols, pos, clearance + molecule_diameter(pos) - extent)


def check_clearance(clearance: float, calculators: Mapping[str, str]) -> dict[str, float]:
    """Refuse (:class:`KdNnpError`) a clearance below pretrained CHGNet's atom-graph cutoff or
    below the known cutoff of any calculator of the run; return ``{label: cutoff}`` of those
    whose cutoff is known (``CHGNet (pretrained)`` always)."""
    cutoffs: dict[str, float] = {}
    why: dict[str, str] = {}
    for label, spec in calculators.items():
        found = calculator_cutoff(get_calc(spec))
        if found is not None:
            cutoffs[label], why[label] = found
    if not any(w == "atom-graph cutoff" for w in why.values()):
        cutoffs["CHGNet (pretrained)"] = student_clearance()
        why["CHGNet (pretrained)"] = "atom-graph cutoff"
    worst = max(cutoffs, key=lambda k: cutoffs[k])
    if clearance < cutoffs[worst]:
        raise KdNnpError(
            f"lattice: clearance {clearance} A is below the {why[worst]} of {worst!r} "
            f"({cutoffs[worst]} A): the gas-phase molecule would see its periodic images; "
            f"use --clearance >= {cutoffs[worst]}"
        )
    return cutoffs


# ------------------------------------------------------------------ gas-phase job
def _gas_task(item: dict[str, Any]) -> dict[str, Any]:
    """Relax one isolated molecule at fixed box (a worker process)."""
    box = atoms_from_dict(item["atoms"])
    calc = get_calc(item["spec"], item.get("fingerprint"))
    if not gas_periodic(item["spec"], calc):
        box.pbc = False  # the teacher's own gas phase (kd_nnp.teachers.calculators.gas_phase)
    gas = item["settings"]
    syms = box.get_chemical_symbols()
    key0 = graph_key(syms, box.positions)
    settings = RelaxSettings(fmax=gas["fmax"], max_steps=gas["max_steps"])
    relaxed, info = relax_structure(box, calc, settings, relax_cell=False)
    pos = relaxed.positions
    whole = one_molecule(syms, pos)
    key1 = graph_key(syms, pos) if whole else None
    return {
        "status": "ok",
        "energy": info["energy"],
        "energy_per_atom": info["energy"] / len(box),
        "converged": info["converged"],
        "steps": info["steps"],
        "fmax_final": info["fmax_final"],
        "wall_s": info["wall_s"],
        "box_edge": float(box.cell.array[0, 0]),
        "periodic": bool(box.pbc.any()),
        "image_clearance_start": image_clearance(box),
        "image_clearance_final": image_clearance(relaxed),
        "isolation_cutoff": item.get("isolation_cutoff", 0.0),
        "one_molecule": bool(whole),
        "same_bond_graph": bool(key1 == key0),
        "final_positions": np.round(pos, 5).tolist(),
    }


def gas_periodic(spec: str, calc: Any) -> bool:
    """Whether a calculator computes the gas-phase molecule in its periodic box: built-in
    teachers as :func:`kd_nnp.teachers.calculators.gas_phase` says (GFN2-xTB and the + D3/D4
    teachers without periodic boundary conditions: periodic GFN2-xTB sums Ewald electrostatics
    and D3's two-body cutoff is 31.75 A, which no affordable box removes); everything else
    (CHGNet, students, SO3LR, ``module:factory``) in the box, whose clearance is checked."""
    kind, _, name = str(spec).partition(":")
    if kind != "teacher":
        return True
    from kd_nnp.teachers.calculators import TEACHERS, gas_phase

    return name not in TEACHERS or gas_phase(name, calc).periodic


def gas_failure(rec: dict[str, Any] | None) -> str:
    """Why a gas record gives no energy ('' when usable). The box keeps its clearance for any
    rigid motion of the molecule, but a relaxation also changes its shape (a few tenths of an
    A): the record fails only when the final clearance is below ``isolation_cutoff``, the
    largest known cutoff of the run's calculators (then a calculator saw an image)."""
    if rec is None:
        return "no gas-phase result"
    if rec.get("status") != "ok":
        return f"error: {str(rec.get('error', '?')).splitlines()[0]}"
    if not rec.get("one_molecule", False):
        return "molecule fell apart"
    if not rec.get("same_bond_graph", False):
        return "bond graph changed"
    if not rec.get("converged", False):
        return "not converged"
    final, cutoff = rec.get("image_clearance_final", math.inf), rec.get("isolation_cutoff", 0.0)
    if final < cutoff:
        return f"final image clearance {final:.2f} A < the cutoff {cutoff} A"
    return ""


# ------------------------------------------------------------------ the benchmark
def default_reference(calculators: Mapping[str, str]) -> str | None:
    """The label of the first ``teacher:NAME`` calculator, else None."""
    return next((lb for lb, spec in calculators.items() if spec.startswith("teacher:")), None)


def _resolve_reference(ref: str | None, calculators: Mapping[str, str]) -> str | None:
    if ref is None:
        return default_reference(calculators)
    if ref in calculators:
        return ref
    by_spec = [lb for lb, spec in calculators.items() if spec == ref]
    if by_spec:
        return by_spec[0]
    raise KdNnpError(
        f"lattice: reference {ref!r} is none of the methods {sorted(calculators)} (labels) "
        f"or their specs {sorted(calculators.values())}"
    )


def run_lattice_benchmark(
    structures: str | Sequence[tuple[str, Atoms]] | Sequence[Crystal],
    calculators: Mapping[str, str] | Sequence[str],
    out_dir: str | Path,
    relax: RelaxSettings | None = None,
    settings: LatticeSettings | None = None,
    *,
    relax_dir: str | Path | None = None,
    workers: int = 1,
    limit: int | None = None,
    max_atoms: int | None = None,
    codes: Sequence[str] | None = None,
    progress: bool = True,
    run: bool = True,
) -> pd.DataFrame:
    """Lattice energy of every crystal with every calculator; one row per (method, crystal).

    ``structures``, ``calculators``, ``limit``, ``max_atoms``, ``codes``, ``workers``: as
    :func:`kd_nnp.evaluation.relax.run_relax_benchmark`, which relaxes the crystals into
    ``relax_dir`` (default ``out_dir/relax``; a relaxation benchmark folder of the same
    crystals, calculators and ``relax`` protocol is reused as it is). Gas-phase relaxations
    stream to ``out_dir/gas.jsonl`` keyed by calculator fingerprint, ``fmax``, ``max_steps``
    and ``clearance`` (resumable after a kill). ``run=False`` only reports what is on disk.
    The frame's ``attrs`` hold ``reference`` and ``skipped``.
    """
    from kd_nnp.evaluation.relax import as_crystals, run_relax_benchmark

    relax = relax or RelaxSettings()
    settings = settings or LatticeSettings()
    calculators = label_calculators(calculators)
    reference = _resolve_reference(settings.reference, calculators)
    out = Path(out_dir)
    skipped: list[tuple[str, str]] = []
    crystals, _ = as_crystals(structures, skipped, limit=limit, max_atoms=max_atoms, codes=codes)
    for f, why in skipped:
        log.warning("skipped %s: %s", f, why)
    kinds: dict[str, list[CrystalMolecule] | str] = {}
    gas_structs: list[Structure] = []
    for c in crystals:
        try:
            kinds[c.id] = distinct_molecules(c.atoms)
        except ValueError as exc:
            kinds[c.id] = f"no molecules: {exc}"
            continue
        for k, kind in enumerate(kinds[c.id]):  # type: ignore[arg-type]
            box = gas_box(kind.symbols, kind.positions, settings.clearance)
            gas_structs.append(
                Structure(f"{c.id}#{k}", box, {"crystal": c.id, "molecule": kind.key,
                                                 "count": kind.count})
            )  # fmt: skip
    gas_key = {"fmax": relax.fmax, "max_steps": relax.max_steps, **settings.protocol()}
    fingerprints = {label: spec_fingerprint(spec) for label, spec in calculators.items()}
    done = {
        (r["method"], r["id"])
        for r in read_jsonl(out / GAS_FILE)
        if is_done(r, fingerprints, gas_key)
    }
    pending = run and any((lb, s.id) not in done for lb in calculators for s in gas_structs)
    # before any relaxation: the clearance against every calculator's cutoff (built here) when
    # gas jobs are to run; against pretrained CHGNet's alone otherwise (records on disk were
    # checked when computed)
    cutoffs = check_clearance(settings.clearance, calculators) if pending else {}
    if run and settings.clearance < student_clearance():
        check_clearance(settings.clearance, {})
    out.mkdir(parents=True, exist_ok=True)
    rdir = Path(relax_dir) if relax_dir is not None else out / "relax"
    relax_df = run_relax_benchmark(
        crystals,
        calculators,
        rdir,
        relax,
        workers=workers,
        references=False,
        progress=progress,
        run=run,
    )
    gas_recs = run_jobs(
        _gas_task,
        calculators,
        gas_structs,
        out / GAS_FILE,
        gas_key,
        payload={"isolation_cutoff": max(cutoffs.values(), default=0.0)},
        workers=workers,
        progress=progress,
        desc="gas",
        run=run,
    )
    records = combine(
        crystals,
        kinds,
        calculators,
        relax_records={
            (r["method"], r["id"]): {k: v for k, v in r.items() if _present(v)}
            for r in relax_df.to_dict("records")
        },
        gas_records=latest([r for r in gas_recs if is_done(r, fingerprints, gas_key)]),
        clearance=settings.clearance,
        relax_key=relax.protocol(),
        gas_key=gas_key,
    )
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    tmp.replace(out / RESULTS_FILE)
    df = pd.DataFrame(records)
    df.attrs.update(reference=reference, skipped=skipped)
    write_lattice_report(df, out, reference=reference, clearance=settings.clearance)
    with (out / "run.json").open("a") as fh:
        fh.write(json.dumps({"calculators": calculators, "reference": reference,
                             "relax": relax.protocol(), "gas": gas_key,
                             "relax_dir": str(rdir)}) + "\n")  # fmt: skip
    return df


def _present(v: Any) -> bool:
    """A value of a DataFrame row that is there (not NaN/None, the frame's fill for columns
    other records have)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def combine(
    crystals: Sequence[Crystal],
    kinds: Mapping[str, list[CrystalMolecule] | str],
    calculators: Mapping[str, str],
    *,
    relax_records: Mapping[tuple[str, str], dict[str, Any]],
    gas_records: Mapping[tuple[str, str], dict[str, Any]],
    clearance: float,
    relax_key: dict[str, Any],
    gas_key: dict[str, Any],
) -> list[dict[str, Any]]:
    """One lattice record per (method, crystal) from the crystal and gas records."""
    out = []
    for label, spec in calculators.items():
        for c in crystals:
            rec: dict[str, Any] = {
                "method": label,
                "spec": spec,
                "id": c.id,
                "formula": c.atoms.get_chemical_formula(),
                "natoms": len(c.atoms),
                "clearance": clearance,
                "settings": {"relax": relax_key, "gas": gas_key},
            }
            why: list[str] = []
            ks = kinds[c.id]
            if isinstance(ks, str):
                rec.update(status="error", error=ks)
                out.append(rec)
                continue
            rec["z"] = sum(k.count for k in ks)
            rec["molecules"] = [{"key": k.key, "count": k.count, "natoms": len(k.symbols)}
                                for k in ks]  # fmt: skip
            cr = relax_records.get((label, c.id))
            if cr is None or cr.get("status") == "missing":
                why.append("crystal: no relaxation result")
            else:
                # the relaxation benchmark's own verdict (protocol.failure_reasons)
                reasons = [r for r in str(cr.get("failure", "")).split("; ") if r]
                why += [f"crystal: {r}" for r in reasons]
                rec["crystal_converged"] = bool(cr.get("converged", False))
                rec["crystal_steps"] = cr.get("steps")
                if cr.get("status") == "ok" and cr.get("energy") is not None:
                    rec["crystal_energy"] = float(cr["energy"])
                    rec["crystal_energy_per_atom"] = float(cr["energy"]) / len(c.atoms)
                    rec["vol_err_pct"] = cr.get("vol_err_pct")
                elif cr.get("status") == "ok":
                    why.append("crystal: the relaxation record has no energy (older run?)")
            gas: dict[str, float] = {}
            rec["gas"] = []
            for k, kind in enumerate(ks):
                gr = gas_records.get((label, f"{c.id}#{k}"))
                g_why = gas_failure(gr)
                g = {"key": kind.key}
                if gr is not None and gr.get("status") == "ok":
                    g.update({f: gr.get(f) for f in ("energy", "energy_per_atom", "steps",
                              "converged", "one_molecule", "same_bond_graph",
                              "image_clearance_final", "isolation_cutoff", "box_edge")})  # fmt: skip
                if g_why:
                    g["failure"] = g_why
                    why.append(f"gas {kind.key}: {g_why}")
                else:
                    gas[kind.key] = float(gr["energy"])  # type: ignore[index]
                rec["gas"].append(g)
            if len(ks) == 1 and rec["gas"]:
                g0 = rec["gas"][0]
                rec.update(gas_energy_per_atom=g0.get("energy_per_atom"),
                           gas_steps=g0.get("steps"), gas_converged=g0.get("converged"),
                           gas_one_molecule=g0.get("one_molecule"))  # fmt: skip
            else:
                rec["gas_steps"] = sum(int(g.get("steps") or 0) for g in rec["gas"])
                rec["gas_converged"] = all(bool(g.get("converged")) for g in rec["gas"])
                rec["gas_one_molecule"] = all(bool(g.get("one_molecule")) for g in rec["gas"])
            if why:
                rec.update(status="error", error="; ".join(why))
            else:
                rec["status"] = "ok"
                rec["e_latt_kj_mol"] = lattice_energy(rec["crystal_energy"], ks, gas)
            out.append(rec)
    return out


# ------------------------------------------------------------------ statistics and report
def per_crystal_table(df: pd.DataFrame) -> pd.DataFrame:
    """Crystals x methods of E_latt (kJ/mol; NaN where it failed), plus ``spread`` (max - min
    across the methods that gave a value, NaN with fewer than two)."""
    methods = list(dict.fromkeys(df["method"])) if len(df) else []
    ok = df[df["status"] == "ok"] if len(df) else df
    wide = (
        ok.pivot(index="id", columns="method", values="e_latt_kj_mol")
        if len(ok)
        else pd.DataFrame()
    )
    ids = list(dict.fromkeys(df["id"])) if len(df) else []
    wide = wide.reindex(index=ids, columns=methods).astype(float)
    n = wide.notna().sum(axis=1)
    wide["spread"] = (wide.max(axis=1) - wide.min(axis=1)).where(n >= 2)
    wide.index.name = "crystal"
    return wide


def summarize_lattice(df: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """Per method: ``n`` (crystals with a value), ``failures``, ``mean`` and ``median`` E_latt
    (kJ/mol); with a reference: over the crystals both have, ``n_paired``, ``mae`` and
    ``mean_diff`` (signed mean of method - reference)."""
    wide = per_crystal_table(df)
    rows = []
    for method in [c for c in wide.columns if c != "spread"]:
        v = wide[method]
        row: dict[str, Any] = {
            "method": method,
            "n": int(v.notna().sum()),
            "failures": int(((df["method"] == method) & (df["status"] != "ok")).sum()),
            "mean": float(v.mean()) if v.notna().any() else math.nan,
            "median": float(v.median()) if v.notna().any() else math.nan,
        }
        if reference is not None and reference in wide:
            d = (v - wide[reference]).dropna()
            row.update(
                n_paired=int(len(d)),
                mae=float(d.abs().mean()) if len(d) else math.nan,
                mean_diff=float(d.mean()) if len(d) else math.nan,
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _spread_line(spread: pd.Series) -> str:
    n = int(spread.notna().sum())
    if not n:
        return "Spread between methods: needs two methods with a value for one crystal."
    return f"Mean spread between methods: {spread.mean():.1f} kJ/mol over {n} crystal(s)."


def write_lattice_report(
    df: pd.DataFrame, out_dir: str | Path, *, reference: str | None, clearance: float
) -> dict[str, Path]:
    """``table.md``, ``table.csv`` (crystals x methods + spread) and ``summary.csv``."""
    out = Path(out_dir)
    wide = per_crystal_table(df)
    summ = summarize_lattice(df, reference)
    paths = {"table_md": out / "table.md", "table_csv": out / "table.csv",
             "summary_csv": out / "summary.csv"}  # fmt: skip
    wide.to_csv(paths["table_csv"])
    summ.to_csv(paths["summary_csv"], index=False)
    ref_text = (
        f"MAE and mean diff are against `{reference}`, over the crystals both have"
        if reference
        else "no reference method"
    )
    md = [
        "# Lattice energies",
        "",
        "E_latt = (E_crystal - sum_k count_k E_gas_k) / sum_k count_k, kJ/mol per molecule: "
        "relaxed crystal (the relaxation benchmark's protocol) vs each distinct molecule "
        f"relaxed alone in a periodic box ({clearance} A clearance to its images). "
        f"Negative: bound; {ref_text}; spread = max - min over the methods per crystal.",
        "",
        markdown.md_table(
            summ,
            [
                ("method", "method"),
                ("n", "n"),
                ("failures", "fail"),
                ("mean", "mean kJ/mol"),
                ("median", "median"),
                ("n_paired", "n paired"),
                ("mae", "MAE vs ref"),
                ("mean_diff", "mean diff vs ref"),
            ],
            "{:.1f}",
        ),  # fmt: skip
        "",
        _spread_line(wide["spread"]),
        "",
        "## Per crystal (kJ/mol)",
        "",
        markdown.md_table(wide.reset_index(), None, "{:.1f}"),
        "",
        "## Failures",
        "",
    ]
    fails = df[df["status"] != "ok"] if len(df) else df
    if len(fails):
        md.append(markdown.md_table(fails, [("method", "method"), ("id", "crystal"),
                                            ("error", "reason")]))  # fmt: skip
    else:
        md.append("none")
    md += ["", "## Details", ""]
    md.append(
        markdown.md_table(
            df,
            [
                ("method", "method"),
                ("id", "crystal"),
                ("z", "Z"),
                ("e_latt_kj_mol", "E_latt"),
                ("crystal_energy_per_atom", "E_cryst eV/atom"),
                ("gas_energy_per_atom", "E_gas eV/atom"),
                ("crystal_steps", "cryst steps"),
                ("gas_steps", "gas steps"),
                ("gas_one_molecule", "one molecule"),
            ],
            "{:.4g}",
        )  # fmt: skip
    )
    paths["table_md"].write_text("\n".join(md) + "\n")
    return paths

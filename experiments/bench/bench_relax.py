"""Relaxation throughput: kd_nnp's ``run_relax_benchmark`` (2 worker processes, 1 thread each,
``InferenceCHGNetCalculator``) vs a plain sequential ASE loop (chgnet's ``CHGNetCalculator``
+ ``FrechetCellFilter`` + ``LBFGS``), same crystals, same settings, one after the other.

    .venv/bin/python experiments/bench/bench_relax.py [--codes UREAXX02,FORMAM,NAPHTA15,BIPHEN]

Settings are kd_nnp's defaults (``kd_nnp.evaluation.protocol.relax_structure``): fmax 0.03 eV/A,
at most 2000 LBFGS steps, ``FrechetCellFilter(exp_cell_factor=1)``, and convergence also
needs max |sigma_ij| < 0.01 GPa: when LBFGS stops with more stress left, it restarts with
fmax lowered to ``0.8 * 0.01 GPa * V`` (the re-convergence round). The ASE loop records
its state after the first LBFGS run (the *plain* loop a user would write) and then runs the
same re-convergence rounds (*same protocol*), so both comparisons come out of one run.

Children (one process each, run one after the other so that each has the machine):

- ``kdnnp``: ``run_relax_benchmark(..., workers=2)``; wall time of the call (spawning the
  workers and loading their models included);
- ``ase``:   the sequential loop; wall time from loading the model to the last crystal;
- ``calc``:  single-point speed of ``InferenceCHGNetCalculator`` vs ``CHGNetCalculator``
  on the same (slightly rattled) structures, calls interleaved, and their max differences.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()
# kd_nnp's defaults (kd_nnp.evaluation.settings.RelaxSettings, protocol.relax_structure)
FMAX, MAX_STEPS, STRESS_TOL_GPA, EXP_CELL_FACTOR, MAX_ROUNDS = 0.03, 2000, 0.01, 1.0, 5


def _crystals(codes: list[str]) -> list[tuple[str, Any]]:
    from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals

    return pyxtal_crystals("test", codes=codes)


def child_kdnnp(cfg: dict[str, Any]) -> dict[str, Any]:
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import RelaxSettings

    crystals = _crystals(cfg["codes"])
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    df = run_relax_benchmark(
        crystals, {"CHGNet": "chgnet"}, cfg["out"],
        RelaxSettings(fmax=FMAX, max_steps=MAX_STEPS, stress_tol_gpa=STRESS_TOL_GPA, rmsd=False),
        workers=cfg["workers"], references=False, progress=False, report=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    per = {}
    for r in df.to_dict("records"):
        per[r["id"]] = {k: r.get(k) for k in ("natoms", "status", "converged", "steps", "rounds",
                        "wall_s", "s_per_step", "volume_exp", "volume_pred", "stress_max_gpa",
                        "error")}  # fmt: skip
    return {"wall_s": wall, "cpu_s": cpu, "crystals": per}


def _cpu_s() -> float:
    """CPU seconds of this process plus its finished children (the pool's workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stress_max_gpa(a: Any) -> float:
    from ase import units

    return float(np.abs(a.get_stress(voigt=False)).max() / units.GPa)


def ase_relax(atoms: Any, calc: Any) -> dict[str, Any]:
    """A plain ASE relaxation (first LBFGS run) and then kd_nnp's re-convergence rounds."""
    from ase import units
    from ase.filters import FrechetCellFilter
    from ase.optimize import LBFGS

    a = atoms.copy()
    a.calc = calc
    t0 = time.perf_counter()
    opt = LBFGS(FrechetCellFilter(a, exp_cell_factor=EXP_CELL_FACTOR), logfile=None)
    ok = opt.run(fmax=FMAX, steps=MAX_STEPS)
    steps, rounds, f_round = opt.nsteps, 1, FMAX
    plain = {"volume": a.get_volume(), "steps": steps, "wall_s": time.perf_counter() - t0,
             "converged": bool(ok), "stress_max_gpa": _stress_max_gpa(a)}  # fmt: skip
    tol = STRESS_TOL_GPA * units.GPa
    while ok and steps < MAX_STEPS and rounds < MAX_ROUNDS:
        f_max = float(np.sqrt((a.get_forces() ** 2).sum(axis=1)).max())
        if f_max < FMAX and np.abs(a.get_stress(voigt=False)).max() < tol:
            break
        f_round = min(f_round, 0.8 * tol * a.get_volume() / EXP_CELL_FACTOR)
        opt = LBFGS(FrechetCellFilter(a, exp_cell_factor=EXP_CELL_FACTOR), logfile=None)
        ok = opt.run(fmax=f_round, steps=MAX_STEPS - steps)
        steps += opt.nsteps
        rounds += 1
    same = {"volume": a.get_volume(), "steps": steps, "rounds": rounds,
            "wall_s": time.perf_counter() - t0, "converged": bool(ok),
            "stress_max_gpa": _stress_max_gpa(a)}  # fmt: skip
    return {"natoms": len(atoms), "volume_exp": atoms.get_volume(), "plain": plain, "same": same}


def _chgnet_ase_calc() -> Any:
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    return CHGNetCalculator(model=model, use_device="cpu")


def child_ase(cfg: dict[str, Any]) -> dict[str, Any]:
    """The sequential loop, once per calculator in ``cfg["calcs"]`` (chgnet's first)."""
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator

    crystals = _crystals(cfg["codes"])
    loops = {}
    for name in cfg["calcs"]:
        t0, cpu0 = time.perf_counter(), _cpu_s()
        calc = _chgnet_ase_calc() if name == "chgnet" else InferenceCHGNetCalculator()
        load_s = time.perf_counter() - t0
        per = {}
        for code, atoms in crystals:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                per[code] = ase_relax(atoms, calc)
        wall = time.perf_counter() - t0
        plain_wall = load_s + sum(r["plain"]["wall_s"] for r in per.values())
        loops[name] = {"wall_s": wall, "plain_wall_s": plain_wall, "load_s": load_s,
                       "cpu_s": _cpu_s() - cpu0, "crystals": per}  # fmt: skip
    return {"loops": loops}


def child_calc(cfg: dict[str, Any]) -> dict[str, Any]:
    """Single points, interleaved: kd_nnp's inference calculator vs chgnet's."""
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator

    calcs = {"chgnet": _chgnet_ase_calc(), "kd_nnp": InferenceCHGNetCalculator()}
    rng = np.random.default_rng(0)
    times: dict[str, dict[str, list[float]]] = {k: {} for k in calcs}
    diffs = {"energy_eV": 0.0, "forces_eV_A": 0.0, "stress_GPa": 0.0}
    for code, atoms in _crystals(cfg["codes"]):
        for rep in range(cfg["repeats"] + 1):
            a = atoms.copy()
            a.positions += rng.normal(scale=0.01, size=a.positions.shape)
            res = {}
            for name in list(calcs) if rep % 2 else list(calcs)[::-1]:
                b = a.copy()
                b.calc = calcs[name]
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res[name] = (b.get_potential_energy(), b.get_forces(), b.get_stress())
                if rep:  # rep 0: warm-up
                    times[name].setdefault(code, []).append(time.perf_counter() - t)
            (e1, f1, s1), (e2, f2, s2) = res["chgnet"], res["kd_nnp"]
            diffs["energy_eV"] = max(diffs["energy_eV"], abs(e1 - e2))
            diffs["forces_eV_A"] = max(diffs["forces_eV_A"], float(np.abs(f1 - f2).max()))
            diffs["stress_GPa"] = max(diffs["stress_GPa"], float(np.abs(s1 - s2).max()) * 160.2177)
    per_code = {
        code: {name: float(np.median(times[name][code])) for name in calcs}
        for code in times["chgnet"]
    }
    return {"s_per_call": per_code, "max_diff": diffs, "natoms": {
        code: len(atoms) for code, atoms in _crystals(cfg["codes"])}}  # fmt: skip


def child_batch(cfg: dict[str, Any]) -> dict[str, Any]:
    """Energy/forces/stress of all crystals in one CHGNet forward vs one crystal at a time
    (the question: would batching several relaxations per forward pay on this CPU?)."""
    import torch
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    model = CHGNet.load(verbose=False).eval()
    crystals = _crystals(cfg["codes"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphs = [model.graph_converter(AseAtomsAdaptor.get_structure(a)) for _, a in crystals]

    def one_by_one() -> list[Any]:
        return [model([g], task="efs")["e"] for g in graphs]

    def batched() -> Any:
        return model(graphs, task="efs")["e"]

    e_single = torch.cat(one_by_one())
    e_batch = batched()
    times: dict[str, list[float]] = {"single": [], "batched": []}
    for rep in range(cfg["repeats"] * 2):
        for name, fn in (("single", one_by_one), ("batched", batched))[:: 1 if rep % 2 else -1]:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {
        "single_s": float(np.median(times["single"])),
        "batched_s": float(np.median(times["batched"])),
        "max_energy_diff_eV_atom": float((e_single - e_batch).abs().max()),
        "natoms": [len(a) for _, a in crystals],
    }


CHILDREN = {"kdnnp": child_kdnnp, "ase": child_ase, "calc": child_calc, "batch": child_batch}


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import shutil

    workdir = Path(workdir)
    out = workdir / "relax_kdnnp"
    if out.exists():  # fresh results: run_relax_benchmark would resume (skip) otherwise
        shutil.rmtree(out)
    res: dict[str, Any] = {"config": dict(cfg), "errors": {}}
    calcs = ["chgnet", "inference"] if cfg.get("ase_inference", True) else ["chgnet"]
    child_cfg = {"codes": cfg["codes"], "workers": cfg.get("workers", 2), "out": str(out),
                 "repeats": cfg.get("repeats", 3), "calcs": calcs}  # fmt: skip
    try:  # can a second process of ours run in parallel at all right now?
        res["parallel_capacity"] = common.parallel_capacity()
    except Exception as exc:  # noqa: BLE001 - informative only
        res["errors"]["parallel_capacity"] = common.error_summary(exc)
    for name in ("kdnnp", "ase", "calc", "batch"):
        t = time.perf_counter()
        try:
            res[name] = common.run_child(HERE, name, child_cfg, workdir / "logs",
                                         timeout=cfg.get("timeout", 1200))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported in the table
            res["errors"][name] = common.error_summary(exc)
            res.setdefault("tracebacks", {})[name] = common.format_exc(exc)
        print(f"  relax/{name}: {time.perf_counter() - t:.0f} s"
              + (f"  FAILED {res['errors'][name]}" if name in res["errors"] else ""),
              flush=True)  # fmt: skip
    return res


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out, row = common.table_rows("relax")

    for name, err in res.get("errors", {}).items():
        row(f"{name} child", "FAILED", err, False)
    pc = res.get("parallel_capacity")
    if pc:
        row("machine: 2 CPU-bound processes vs 1 (just before)", f"{pc['speedup']:.2f}x",
            f"pure-Python loop alone {pc['one_s']:.2f} s, two at once "
            f"{' / '.join(f'{t:.2f}' for t in pc['two_s'])} s; 2.0 = two free cores")  # fmt: skip
    kd = res.get("kdnnp")
    loops = (res.get("ase") or {}).get("loops", {})
    codes = res["config"]["codes"]
    if kd:
        n = len(kd["crystals"])
        bad = [c for c, r in kd["crystals"].items() if r["status"] != "ok" or not r["converged"]]
        atoms = [kd["crystals"][c]["natoms"] for c in kd["crystals"]]
        task_s = sum(r["wall_s"] or 0 for r in kd["crystals"].values())
        row("kd_nnp run_relax_benchmark, 2 workers", f"{kd['wall_s']:.1f} s",
            f"{n} crystals ({min(atoms)}-{max(atoms)} atoms), "
            f"{sum(r['steps'] or 0 for r in kd['crystals'].values())} steps, "
            f"{task_s:.1f} s of relaxations in the workers, {kd['cpu_s']:.1f} CPU s; "
            f"{n / kd['wall_s'] * 60:.2f} crystals/min"
            + (f"; NOT converged/failed: {bad}" if bad else ""), False if bad else None)  # fmt: skip
    labels = {"chgnet": "CHGNetCalculator", "inference": "InferenceCHGNetCalculator"}
    for name, lp in loops.items():
        n = len(lp["crystals"])
        steps_p = sum(r["plain"]["steps"] for r in lp["crystals"].values())
        steps_s = sum(r["same"]["steps"] for r in lp["crystals"].values())
        if name == "chgnet":
            row(f"sequential ASE loop ({labels[name]}), plain", f"{lp['plain_wall_s']:.1f} s",
                f"{steps_p} steps, one LBFGS run per crystal; "
                f"{n / lp['plain_wall_s'] * 60:.2f} crystals/min")  # fmt: skip
        row(f"sequential ASE loop ({labels[name]}), same protocol", f"{lp['wall_s']:.1f} s",
            f"{steps_s} steps, with the stress re-convergence rounds, {lp['cpu_s']:.1f} CPU s; "
            f"{n / lp['wall_s'] * 60:.2f} crystals/min")  # fmt: skip
    if kd and loops:
        cases = []
        if "chgnet" in loops:
            cases += [("chgnet", "plain", loops["chgnet"]["plain_wall_s"]),
                      ("chgnet", "same", loops["chgnet"]["wall_s"])]  # fmt: skip
        if "inference" in loops:
            cases += [("inference", "same", loops["inference"]["wall_s"])]
        for name, key, wall in cases:
            ratio = wall / kd["wall_s"]
            what = f"throughput kd_nnp / ASE loop ({labels[name]}, {key})"
            if name == "chgnet":
                row(what, f"{ratio:.2f}x", "target >= 2x", ratio >= 2)
            else:
                row(what, f"{ratio:.2f}x", "same calculator: the gain of 2 worker processes")
        if "chgnet" in loops:
            r_cpu = loops["chgnet"]["cpu_s"] / kd["cpu_s"]
            row("CPU time ASE loop (CHGNetCalculator, same) / kd_nnp", f"{r_cpu:.2f}x",
                "load-independent part of the throughput ratio (calculator + driver, worker "
                f"start included); on 2 free cores the 2 workers make it up to ~{2 * r_cpu:.1f}x "
                "(less the imbalance of the last crystal)")  # fmt: skip
        for name, key, _ in cases:
            diffs = {}
            for c in codes:
                k, a = kd["crystals"].get(c), loops[name]["crystals"].get(c)
                if k and a and k.get("volume_pred"):
                    diffs[c] = 100 * (k["volume_pred"] / a[key]["volume"] - 1)
            if not diffs:
                continue
            worst = max(diffs, key=lambda c: abs(diffs[c]))
            detail = ", ".join(f"{c} {d:+.3f}" for c, d in diffs.items()) + " (%)"
            what = f"final volume kd_nnp vs ASE loop ({labels[name]}, {key})"
            if name == "chgnet":
                row(what, f"max {abs(diffs[worst]):.3f} %", detail + "; target <= 0.1 %",
                    abs(diffs[worst]) <= 0.1)  # fmt: skip
            else:
                row(what, f"max {abs(diffs[worst]):.3f} %", detail + "; same calculator")
        rounds = {c: r["rounds"] for c, r in kd["crystals"].items()}
        if "chgnet" in loops:
            smax = {c: r["plain"]["stress_max_gpa"] for c, r in loops["chgnet"]["crystals"].items()}
            row("LBFGS rounds per crystal (kd_nnp)", ", ".join(f"{c} {k}" for c, k in rounds.items()),
                "max |sigma| left by the plain ASE run (GPa; kd_nnp needs < 0.01): "
                + ", ".join(f"{c} {s:.4f}" for c, s in smax.items()))  # fmt: skip
    ca = res.get("calc")
    if ca:
        parts, ratios = [], []
        for code, t in ca["s_per_call"].items():
            ratios.append(t["chgnet"] / t["kd_nnp"])
            parts.append(f"{code} ({ca['natoms'][code]}) {t['chgnet'] * 1e3:.0f} -> "
                         f"{t['kd_nnp'] * 1e3:.0f} ms")  # fmt: skip
        d = ca["max_diff"]
        row("single point CHGNetCalculator -> InferenceCHGNetCalculator",
            f"{np.mean(ratios):.2f}x faster",
            "; ".join(parts) + f"; max diff E {d['energy_eV']:.1e} eV, F {d['forces_eV_A']:.1e} "
            f"eV/A, S {d['stress_GPa']:.1e} GPa")  # fmt: skip
    ba = res.get("batch")
    if ba:
        gain = ba["single_s"] / ba["batched_s"]
        row(f"{len(ba['natoms'])} crystals in one CHGNet forward (E, F, S) vs one at a time",
            f"{gain:.2f}x", f"{ba['single_s'] * 1e3:.0f} ms one by one, {ba['batched_s'] * 1e3:.0f}"
            f" ms batched ({'+'.join(map(str, ba['natoms']))} atoms, 1 thread); same energies "
            f"within {ba['max_energy_diff_eV_atom']:.1e} eV/atom; the ase backend (worker "
            "processes) stays the CPU default, the batched backend is for GPUs", None)  # fmt: skip
    return out


def main() -> None:
    if common.child_main(CHILDREN):
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", default="UREAXX02,FORMAM,NAPHTA15,BIPHEN")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="single points per crystal")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args()
    cfg = {"codes": args.codes.split(","), "workers": args.workers, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="kd_bench_relax_") as tmp:
        res = run(cfg, Path(args.workdir or tmp))
    for r in rows(res):
        flag = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        print(f"{r['what']:<58} {r['value']:<16} {r['compare']} {flag}")


if __name__ == "__main__":
    main()

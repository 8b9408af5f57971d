"""Leave-molecule-out cross-validation (`kd-nnp evaluate cv`, kd_nnp.evaluation.cv): folds of
whole molecules, the summary and its bootstrap intervals, the lattice step on known-answer
calculators (the CV's own relaxations reused, each fold's student on its own crystals, resumed
gas relaxations), and (slow) the verb end to end on 3 tiny crystals in 2 folds, the lattice
step added to a finished CV, resumed after an interruption."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_eval_lattice import BoundMoleculesCalc

from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.cv import (
    BASELINES,
    CHGNET,
    LATTICE,
    STUDENT,
    assign_folds,
    baseline_calculators,
    cv_crystals,
    cv_lattice,
    cv_summary,
    fold_relax_dir,
    label_cv_store,
    label_set_teachers,
    lattice_markdown,
    lattice_summary,
    make_folds,
    molecule_groups,
    summary_markdown,
    teacher_label,
)
from kd_nnp.evaluation.lattice import EV_TO_KJ_MOL, lattice_energy
from kd_nnp.evaluation.settings import LatticeSettings, RelaxSettings
from kd_nnp.evaluation.stats import bootstrap_ci
from kd_nnp.utils.jsonl import read_jsonl


def test_molecule_groups_are_transitive():
    ids = [["a"], ["b"], ["a", "c"], ["c", "d"], ["e"], ["d"]]
    assert molecule_groups(ids) == [[0, 2, 3, 5], [1], [4]]
    assert molecule_groups([]) == []


def test_assign_folds_balanced_and_seeded():
    groups = [[0, 1, 2], [3], [4], [5, 6], [7], [8]]
    f = assign_folds(groups, 3, seed=0)
    sizes = [sum(len(g) for g, k in zip(groups, f) if k == fold) for fold in range(3)]
    assert sorted(sizes) == [3, 3, 3] and f[0] == 0  # the largest group goes first, to fold 0
    assert assign_folds(groups, 3, seed=0) == f
    assert {tuple(assign_folds(groups, 3, seed=s)) for s in range(6)} != {tuple(f)}
    with pytest.raises(KdNnpError, match="cv.folds=7 but only 6 groups"):
        assign_folds(groups, 7, seed=0)
    with pytest.raises(KdNnpError, match="cv.folds must be >= 2"):
        assign_folds(groups, 1, seed=0)


def test_folds_keep_polymorphs_together():
    """TEPNIT02 and TEPNIT12 (mech.db) are polymorphs of one molecule: one fold; no molecule
    key is in two folds; every crystal is in exactly one fold."""
    codes = ["TEPNIT02", "OXALAC11", "UREAXX02", "TEPNIT12", "FORMAM"]
    crystals, _ = cv_crystals(["test", "mech"], 24, codes)
    assert sorted(c for c, _ in crystals) == sorted(codes)
    for seed in range(4):
        folds = make_folds(crystals, 2, seed)
        where = {c: fd["fold"] for fd in folds for c in fd["crystals"]}
        assert sorted(where) == sorted(codes)
        assert where["TEPNIT02"] == where["TEPNIT12"]
        assert not set(folds[0]["molecules"]) & set(folds[1]["molecules"])
        assert sorted(len(fd["crystals"]) for fd in folds) == [2, 3]
    with pytest.raises(KdNnpError, match="NOPE"):
        cv_crystals(["test"], 24, ["FORMAM", "NOPE"])


def test_bootstrap_interval():
    v = np.array([-3.0, 1.0, 2.0, 6.0, -0.5, 4.0])
    lo, hi = bootstrap_ci(v, n_boot=4000, seed=1)
    mae = np.abs(v).mean()
    assert lo < mae < hi and 0 < lo and hi <= np.abs(v).max()
    assert bootstrap_ci(v, n_boot=4000, seed=1) == (lo, hi)
    assert bootstrap_ci([2.0, -2.0, 2.0], seed=0) == (2.0, 2.0)
    slo, shi = bootstrap_ci(v, absolute=False, seed=1)
    assert slo < v.mean() < shi
    assert all(math.isnan(x) for x in bootstrap_ci([], seed=0))
    # four times the crystals: about half the width
    lo4, hi4 = bootstrap_ci(np.tile(v, 4), n_boot=4000, seed=1)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.65


def _rows(method, errs, fold=0, status=None, failure=None):
    out = []
    for i, e in enumerate(errs):
        out.append({
            "fold": fold if isinstance(fold, int) else fold[i], "method": method, "id": f"X{i}",
            "status": (status or ["ok"] * len(errs))[i], "failure": (failure or [""] * len(errs))[i],
            "vol_err_pct": e, "rmsd15": 0.1 * (i + 1),
        })  # fmt: skip
    return out


def test_summary_values():
    teacher = "teacher (t)"
    folds = [0, 0, 1, 1]
    per = pd.DataFrame(
        _rows(STUDENT, [1.0, -2.0, 3.0, float("nan")], folds, ["ok", "ok", "ok", "error"],
              ["", "not converged", "", "error"])
        + _rows(teacher, [0.5, -1.0, 2.0, 4.0], folds)
        + _rows(CHGNET, [10.0, 12.0, 14.0, 16.0], folds)
    )  # fmt: skip
    s = cv_summary(per, "t", n_boot=500, seed=3)
    st = s["methods"][STUDENT]
    assert st["n"] == 3 and st["n_crystals"] == 4 and st["failures"] == 2
    assert st["vol_mae_pct"] == pytest.approx(2.0) and st["vol_mean_pct"] == pytest.approx(2 / 3)
    assert st["vol_median_pct"] == pytest.approx(1.0)
    assert st["rmsd15_mean"] == pytest.approx(0.2)
    lo, hi = st["vol_mae_ci95_pct"]
    assert lo <= 2.0 <= hi and (lo, hi) == bootstrap_ci([1.0, -2.0, 3.0], n_boot=500, seed=3)
    assert s["methods"][CHGNET]["vol_mae_pct"] == pytest.approx(13.0)
    d = s["to_teacher"][STUDENT]  # |0.5| + |-1| + |1| over the 3 crystals both relaxed
    assert d["n"] == 3 and d["mean_abs_pct"] == pytest.approx(2.5 / 3)
    assert s["to_teacher"][CHGNET]["mean_abs_pct"] == pytest.approx((9.5 + 13 + 12 + 12) / 4)
    assert [f["vol_mae_pct"] for f in s["student_per_fold"]] == pytest.approx([1.5, 3.0])
    assert [f["n"] for f in s["student_per_fold"]] == [2, 1]


def test_label_set_teachers_are_baselines():
    # the teachers the students learn from (weight > 0) are relaxed as baselines too; a label
    # set that names no runnable teacher (imported labels) is kept apart
    spec = {"so3lr": 1, "chgnet_d3": 0.5, "pfp_import": 1, "gfn2": 0}
    assert label_set_teachers(spec) == (["so3lr", "chgnet_d3"], ["pfp_import"])
    assert label_set_teachers("pkg.mod:factory") == (["pkg.mod:factory"], [])
    assert label_set_teachers(None) == ([], [])
    with pytest.raises(ValueError, match="every weight is 0"):
        label_set_teachers({"so3lr": 0})
    assert baseline_calculators("so3lr", ["so3lr", "chgnet_d3"]) == {
        CHGNET: "chgnet", "teacher (so3lr)": "teacher:so3lr",
        "teacher (chgnet_d3)": "teacher:chgnet_d3",
    }  # fmt: skip
    assert baseline_calculators("so3lr") == {CHGNET: "chgnet", "teacher (so3lr)": "teacher:so3lr"}


def test_label_cv_store_labels_every_teacher(tmp_path, monkeypatch):
    import kd_nnp.teachers.label as label_mod
    from kd_nnp.data.store import FrameStore

    FrameStore(tmp_path / "s", create=True)
    calls = []
    monkeypatch.setattr(label_mod, "label_store", lambda store, name, workers: calls.append(name))
    label_cv_store(tmp_path / "s", "so3lr", {"chgnet_d3": 1, "so3lr": 1, "gfn2": 0}, 2)
    assert calls == ["so3lr", "chgnet_d3"]  # the reference once, then the others; weight 0 not
    calls.clear()
    with pytest.raises(KdNnpError, match=r"\['pfp_import'\].*label set of .*it has \[\]"):
        label_cv_store(tmp_path / "s", "so3lr", {"pfp_import": 1}, 1)


def test_summary_distance_to_every_teacher():
    folds = [0, 0, 1, 1]
    per = pd.DataFrame(
        _rows(STUDENT, [1.0, -2.0, 3.0, 4.0], folds)
        + _rows("teacher (t)", [0.5, -1.0, 2.0, 4.0], folds)
        + _rows("teacher (u)", [2.0, -4.0, 3.0, float("nan")], folds, ["ok", "ok", "ok", "error"])
        + _rows(CHGNET, [10.0, 12.0, 14.0, 16.0], folds)
    )  # fmt: skip
    s = cv_summary(per, "t", n_boot=200, seed=0)
    assert list(s["to_teachers"]) == ["teacher (t)", "teacher (u)"]
    assert s["to_teachers"]["teacher (t)"] == s["to_teacher"]
    u = s["to_teachers"]["teacher (u)"]
    assert u[STUDENT]["reference"] == "teacher (u)" and u[STUDENT]["n"] == 3
    assert u[STUDENT]["mean_abs_pct"] == pytest.approx((1 + 2 + 0) / 3)
    assert u[CHGNET]["mean_abs_pct"] == pytest.approx((8 + 16 + 11) / 3)
    md = summary_markdown(s)
    assert f"{STUDENT} vs teacher (u): mean |dV - dV_teacher| = 1.00 %" in md
    assert f"{STUDENT} vs teacher (t)" in md


def test_lattice_summary_values():
    """Failures (status error) give no value and are counted; MAE and signed mean against the
    teacher over the crystals both have, with their seeded bootstrap intervals; the spread."""
    t = teacher_label("t")
    rows = [  # (method, crystal, fold, E_latt or None = failed)
        (t, "A", 0, -50.0), (t, "B", 0, -60.0), (t, "C", 1, -80.0), (t, "D", 1, None),
        (STUDENT, "A", 0, -45.0), (STUDENT, "B", 0, -70.0), (STUDENT, "C", 1, None),
        (STUDENT, "D", 1, -40.0),
        (CHGNET, "A", 0, -30.0), (CHGNET, "B", 0, -35.0), (CHGNET, "C", 1, -50.0),
        (CHGNET, "D", 1, -20.0),
    ]  # fmt: skip
    per = pd.DataFrame(
        [{"fold": f, "method": m, "id": c, "status": "ok" if e is not None else "error",
          "e_latt_kj_mol": e if e is not None else np.nan} for m, c, f, e in rows]
    )  # fmt: skip
    s = lattice_summary(per, "t", n_boot=500, seed=2)
    st = s["methods"][STUDENT]
    assert (st["n"], st["n_crystals"], st["failures"]) == (3, 4, 1)
    assert st["mean_kj_mol"] == pytest.approx(-155 / 3) and st["median_kj_mol"] == -45.0
    assert s["methods"][t]["failures"] == 1 and s["methods"][CHGNET]["failures"] == 0
    d = s["to_teacher"][STUDENT]  # A: +5, B: -10 (C: student failed, D: teacher failed)
    assert d["n"] == 2 and d["reference"] == t
    assert d["mae_kj_mol"] == pytest.approx(7.5) and d["mean_diff_kj_mol"] == pytest.approx(-2.5)
    assert tuple(d["mae_ci95_kj_mol"]) == bootstrap_ci([5.0, -10.0], n_boot=500, seed=2)
    assert tuple(d["mean_diff_ci95_kj_mol"]) == bootstrap_ci(
        [5.0, -10.0], n_boot=500, seed=2, absolute=False
    )
    c = s["to_teacher"][CHGNET]  # +20, +25, +30
    assert c["n"] == 3 and c["mae_kj_mol"] == pytest.approx(25.0) == c["mean_diff_kj_mol"]
    # spread max - min per crystal: A 20, B 35, C 30 (two methods), D 20 (two methods)
    sp = s["spread"]
    assert sp["n"] == 4 and sp["mean_kj_mol"] == pytest.approx(26.25)
    assert sp["max_kj_mol"] == 35.0 and sp["median_kj_mol"] == pytest.approx(25.0)
    assert sp["n_all_methods"] == 2 and sp["mean_all_methods_kj_mol"] == pytest.approx(27.5)
    assert s["student_per_fold"] == [
        {"fold": 0, "n": 2, "mae_kj_mol": pytest.approx(7.5)},
        {"fold": 1, "n": 0, "mae_kj_mol": None},
    ]
    md = lattice_markdown(s)
    assert "7.5 [" in md and "-2.5 [" in md and "mean 26.2" in md


# known-answer calculators (test_eval_lattice.BoundMoleculesCalc: E_latt = -eps eV per
# molecule in any crystal; forces and stress zero, so every relaxation stops at once), one
# binding energy per method so that the numbers say which calculator gave them
LAT_EPS = {"chgnet": 0.3, "teacher": 0.5, "student0": 0.4, "student1": 0.7}


def chgnet_calc():
    return BoundMoleculesCalc(eps=LAT_EPS["chgnet"])


def teacher_calc():
    return BoundMoleculesCalc(eps=LAT_EPS["teacher"])


def student0_calc():
    return BoundMoleculesCalc(eps=LAT_EPS["student0"])


def student1_calc():
    return BoundMoleculesCalc(eps=LAT_EPS["student1"])


def test_cv_lattice_reuses_the_relaxations_per_fold_and_resumes(tmp_path, monkeypatch):
    """The lattice step on the CV's relaxations (made here as run_cv makes them, known-answer
    calculators): no crystal is relaxed again; each value is lattice_energy() of the recorded
    crystal and gas energies; fold k's student gives fold k's crystals only; the summary is
    those values; deleted gas records, and only they, are recomputed."""
    import kd_nnp.evaluation.relax as relax_mod
    from kd_nnp.evaluation.relax import run_relax_benchmark

    out = tmp_path / "cv"
    crystals, _ = cv_crystals(["test", "mech"], 16, ["TEPNIT02", "TEPNIT12", "UREAXX02"])
    folds = make_folds(crystals, 2, 0)
    fold_of = {c: fd["fold"] for fd in folds for c in fd["crystals"]}
    assert fold_of == {"TEPNIT02": 0, "TEPNIT12": 0, "UREAXX02": 1}
    by_code = dict(crystals)
    students = {k: f"test_eval_cv:student{k}_calc" for k in (0, 1)}
    tl = teacher_label("t")
    baselines = {CHGNET: "test_eval_cv:chgnet_calc", tl: "test_eval_cv:teacher_calc"}
    eps = {CHGNET: LAT_EPS["chgnet"], tl: LAT_EPS["teacher"]}
    relax = RelaxSettings(rmsd=False)
    kw = dict(workers=1, references=False, progress=False)
    for fd in folds:  # run_cv's relaxations
        k = fd["fold"]
        run_relax_benchmark([(c, by_code[c]) for c in fd["crystals"]], {STUDENT: students[k]},
                            fold_relax_dir(out, k), relax, **kw)  # fmt: skip
    run_relax_benchmark(crystals, baselines, out / BASELINES, relax, **kw)
    relax_files = [fold_relax_dir(out, 0) / "relax.jsonl", fold_relax_dir(out, 1) / "relax.jsonl",
                   out / BASELINES / "relax.jsonl"]  # fmt: skip
    relax_text = {f: f.read_text() for f in relax_files}
    assert [len(read_jsonl(f)) for f in relax_files] == [2, 1, 6]

    relaxed = []  # every crystal relaxation from now on (run_jobs calls it in this process)
    task = relax_mod._relax_task
    monkeypatch.setattr(relax_mod, "_relax_task", lambda item: relaxed.append(item) or task(item))

    def lattice():
        return cv_lattice(out, crystals, folds, students, baselines, relax, LatticeSettings(),
                          teacher="t", workers=1, progress=False, n_boot=300, seed=1)  # fmt: skip

    per, summ = lattice()
    assert relaxed == [] and {f: f.read_text() for f in relax_files} == relax_text
    assert not list((out / LATTICE).glob("*/relax"))  # no relaxation folder of its own
    assert len(per) == 9 and (per["status"] == "ok").all(), per["error"].tolist()

    # each value from the recorded crystal energy (the CV's relax.jsonl) and gas energies
    crystal_e = {}
    for f in relax_files:
        for r in read_jsonl(f):
            crystal_e[(r["method"], r["id"], r["spec"])] = r["energy"]
    for row in per.to_dict("records"):
        c, m, k = row["id"], row["method"], row["fold"]
        assert k == fold_of[c]
        spec = students[k] if m == STUDENT else baselines[m]
        gas_file = out / LATTICE / (f"fold{k}" if m == STUDENT else BASELINES) / "gas.jsonl"
        gas = {r["molecule"]: r["energy"] for r in read_jsonl(gas_file)
               if r["method"] == m and r["crystal"] == c and r["spec"] == spec}  # fmt: skip
        expected = lattice_energy(crystal_e[(m, c, spec)], by_code[c], gas)
        assert row["e_latt_kj_mol"] == pytest.approx(expected, rel=1e-12)
        # ... and from the calculator that should have given it: fold k's student for fold k
        e = LAT_EPS[f"student{k}"] if m == STUDENT else eps[m]
        assert row["e_latt_kj_mol"] == pytest.approx(-e * EV_TO_KJ_MOL, rel=1e-9)
        assert row["crystal_energy"] == crystal_e[(m, c, spec)]
        z = row["z"]
        assert (row["crystal_energy"] - row["gas_energy"]) / z * EV_TO_KJ_MOL == pytest.approx(
            row["e_latt_kj_mol"]
        )
    for k in (0, 1):  # a fold's gas relaxations: its student, its crystals
        recs = read_jsonl(out / LATTICE / f"fold{k}" / "gas.jsonl")
        assert {r["spec"] for r in recs} == {students[k]}
        assert {r["crystal"] for r in recs} == {c for c, f in fold_of.items() if f == k}
    assert len(read_jsonl(out / LATTICE / BASELINES / "gas.jsonl")) == 6

    # the summary is those values
    csv = pd.read_csv(out / LATTICE / "per_crystal.csv")
    assert csv["e_latt_kj_mol"].tolist() == pytest.approx(per["e_latt_kj_mol"].tolist())
    v = per.set_index(["method", "id"])["e_latt_kj_mol"]
    for m in (STUDENT, CHGNET, tl):
        assert summ["methods"][m]["mean_kj_mol"] == pytest.approx(v[m].mean())
        assert summ["methods"][m]["n"] == 3 and summ["methods"][m]["failures"] == 0
    d = v[STUDENT] - v[tl]
    st = summ["to_teacher"][STUDENT]
    assert st["mae_kj_mol"] == pytest.approx(d.abs().mean())
    assert st["mae_kj_mol"] == pytest.approx((0.1 + 0.1 + 0.2) / 3 * EV_TO_KJ_MOL)
    assert st["mean_diff_kj_mol"] == pytest.approx(0.0, abs=1e-9)
    assert tuple(st["mean_diff_ci95_kj_mol"]) == bootstrap_ci(d, n_boot=300, seed=1, absolute=False)
    assert summ["to_teacher"][CHGNET]["mean_diff_kj_mol"] == pytest.approx(0.2 * EV_TO_KJ_MOL)
    # spread: TEPNIT 0.5 - 0.3 eV, UREA 0.7 - 0.3 eV
    assert summ["spread"]["mean_kj_mol"] == pytest.approx((0.2 + 0.2 + 0.4) / 3 * EV_TO_KJ_MOL)
    wide = pd.read_csv(out / LATTICE / "table.csv", index_col="crystal")
    assert list(wide.columns) == ["fold", CHGNET, STUDENT, tl, "spread"]
    assert wide.loc["UREAXX02", "spread"] == pytest.approx(0.4 * EV_TO_KJ_MOL)

    # kill -9 during the gas relaxations: the last record of a fold and of the baselines lost
    gas_files = [out / LATTICE / d / "gas.jsonl" for d in ("fold0", "fold1", BASELINES)]
    full = {f: f.read_text().splitlines(keepends=True) for f in gas_files}
    for f in gas_files[1:]:
        f.write_text("".join(full[f][:-1]))
    per2, summ2 = lattice()
    assert relaxed == [] and {f: f.read_text() for f in relax_files} == relax_text
    for f in gas_files:
        lines = f.read_text().splitlines(keepends=True)
        assert len(lines) == len(full[f])  # the lost one again, nothing else
        cut = len(full[f]) - (f != gas_files[0])
        assert lines[:cut] == full[f][:cut]
        assert [json.loads(ln)["id"] for ln in lines[cut:]] == [
            json.loads(ln)["id"] for ln in full[f][cut:]
        ]
    assert per2["e_latt_kj_mol"].tolist() == per["e_latt_kj_mol"].tolist()
    assert summ2 == summ


def _close(a, b) -> bool:
    """Nested dicts/lists equal, numbers to 1e-9 (a CSV round trip)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


TINY = [
    "teacher=chgnet", "cv.codes=[TEPNIT02,TEPNIT12,UREAXX02]", "cv.max_atoms=16",
    "cv.folds=2", "cv.workers=1", "cv.bootstrap=500", "demo.frames.n_strain=2",
    "demo.frames.n_rattle=1", "demo.frames.prerelax_steps=0", "demo.relax.max_steps=5",
    "+demo.relax.fmax=0.2", "trainer.max_epochs=2", "data.grouped=false",
    "data.n_val=1", "trainer.enable_progress_bar=false", "validate_before_training=false",
]  # fmt: skip


@pytest.mark.slow  # ~90-120 s on 2 shared cores: 2 trainings, 9 short relaxations, the lattice
def test_cv_end_to_end_and_resume(tmp_path, monkeypatch):  # step, then a resume
    from kd_nnp.cli.evaluate import main
    from kd_nnp.data.store import FrameStore

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cv"
    argv = ["cv", f"cv.out={out}", f"paths.output_dir={tmp_path}", *TINY]
    assert main([*argv, "cv.lattice=false"]) == 0
    assert not (out / LATTICE).exists()
    assert "lattice" not in json.loads((out / "summary.json").read_text())
    folds = json.loads((out / "folds.json").read_text())["folds"]
    fold_of = {c: fd["fold"] for fd in folds for c in fd["crystals"]}
    assert fold_of == {"TEPNIT02": 0, "TEPNIT12": 0, "UREAXX02": 1}
    assert not set(folds[0]["molecules"]) & set(folds[1]["molecules"])

    # each fold's student never saw its fold's molecules: exactly their frames were dropped
    store = FrameStore(out / "store")
    parents = pd.Series([f.frame_id.split("/")[0] for f in store.iter_frames()]).value_counts()
    for fd in folds:
        summ = json.loads((out / f"fold{fd['fold']}" / "train" / "data_summary.json").read_text())
        assert summ["excluded"]["groups"] == sorted(fd["crystals"])
        assert summ["excluded"]["n_frames"] == sum(parents[c] for c in fd["crystals"])
        seen = set(summ["train_groups"]) | set(summ["val_groups"])
        assert seen == set(fold_of) - set(fd["crystals"])

    # every crystal once per method; the student's row comes from the fold holding it
    per = pd.read_csv(out / "per_crystal.csv", keep_default_na=False, na_values=[""])
    assert len(per) == 9
    for method, g in per.groupby("method"):
        assert sorted(g["id"]) == sorted(fold_of), method
        assert all(fold_of[c] == f for c, f in zip(g["id"], g["fold"]))
    stud = per[per["method"] == STUDENT].set_index("id")
    for c in fold_of:
        rec = [json.loads(ln) for ln in (out / f"fold{fold_of[c]}" / "relax" / "relax.jsonl")
               .read_text().splitlines()]  # fmt: skip
        assert [r["id"] for r in rec if r["id"] == c] == [c]
        assert f"fold{fold_of[c]}/train/student.pt" in rec[0]["spec"]
        assert stud.loc[c, "vol_err_pct"] == pytest.approx(
            next(r["vol_err_pct"] for r in rec if r["id"] == c)
        )

    # the summary is what per_crystal.csv says (recomputed here without kd_nnp)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {STUDENT, CHGNET, "teacher (chgnet)"}
    for method, g in per.groupby("method"):
        ok = g[g["status"] == "ok"]
        s = summary["methods"][method]
        assert s["n"] == len(ok) == 3
        assert s["failures"] == int(g["failure"].fillna("").astype(bool).sum())
        assert s["vol_mae_pct"] == pytest.approx(ok["vol_err_pct"].abs().mean())
        assert s["vol_mean_pct"] == pytest.approx(ok["vol_err_pct"].mean())
        assert s["vol_median_pct"] == pytest.approx(ok["vol_err_pct"].median())
        assert s["rmsd15_mean"] == pytest.approx(ok["rmsd15"].mean())
        lo, hi = s["vol_mae_ci95_pct"]
        assert lo <= s["vol_mae_pct"] <= hi
    t = per[per["method"] == "teacher (chgnet)"].set_index("id")["vol_err_pct"]
    dist = (stud["vol_err_pct"] - t).abs().mean()
    assert summary["to_teacher"][STUDENT]["mean_abs_pct"] == pytest.approx(dist)
    assert summary["to_teacher"][STUDENT]["n"] == 3
    assert [f["excluded_frames"] for f in summary["folds"]] == [
        sum(parents[c] for c in fd["crystals"]) for fd in folds
    ]
    for png in ("parity_volume.png", "hist_volume_error.png"):
        assert (out / png).stat().st_size > 5000
    assert "95 % interval" in (out / "summary.md").read_text()

    # the lattice step added to the finished CV: its only new work (nothing trained or relaxed
    # again); the student of fold k on fold k's crystals
    done = [
        out / f"fold{k}" / d / f
        for k in (0, 1)
        for d, f in (("train", "metrics.json"), ("train", "student.pt"), ("relax", "relax.jsonl"))
    ]
    done = {p: p.stat().st_mtime_ns for p in [*done, out / BASELINES / "relax.jsonl"]}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in done} == done
    lat = pd.read_csv(out / LATTICE / "per_crystal.csv")
    assert len(lat) == 9 and set(lat["status"]) <= {"ok", "error"}
    assert lat["error"].notna().sum() == (lat["status"] == "error").sum()
    for k in (0, 1):
        gas = read_jsonl(out / LATTICE / f"fold{k}" / "gas.jsonl")
        (spec,) = {r["spec"] for r in gas}
        assert spec.startswith("student:") and spec.endswith(f"fold{k}/train/student.pt")
        assert {r["crystal"] for r in gas} == {c for c, f in fold_of.items() if f == k}
    with_lat = json.loads((out / "summary.json").read_text())
    assert _close(
        with_lat["lattice"], {**lattice_summary(lat, "chgnet", n_boot=500, seed=0), "clearance": 30}
    )
    assert with_lat["methods"] == summary["methods"]
    assert "Lattice energies" in (out / "summary.md").read_text()

    # interruption: fold 1 was killed after its last epoch (no metrics.json) and before its
    # relaxations; the rerun finishes it and leaves fold 0 and the baselines alone
    f0 = out / "fold0" / "train" / "metrics.json"
    stamps = {p: p.stat().st_mtime_ns for p in (f0, out / "fold0" / "relax" / "relax.jsonl",
                                                out / "baselines" / "relax.jsonl")}  # fmt: skip
    (out / "fold1" / "train" / "metrics.json").unlink()
    (out / "fold1" / "relax" / "relax.jsonl").unlink()
    (out / "summary.json").unlink()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "summary.json").read_text())
    for method, s in summary["methods"].items():
        assert again["methods"][method]["vol_mae_pct"] == pytest.approx(s["vol_mae_pct"], abs=1e-6)
    # a relaunch that would draw other folds into the same folder is refused
    with pytest.raises(KdNnpError, match=r"folds.json records folds .*\['seed'\]"):
        main([*argv, "cv.seed=5"])

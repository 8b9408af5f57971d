"""Leave-molecule-out cross-validation (`kd-nnp evaluate cv`, kd_nnp.evaluation.cv): folds of
whole molecules, the summary and its bootstrap intervals, and (slow) the verb end to end on 3
tiny crystals in 2 folds, resumed after an interruption."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.cv import (
    CHGNET,
    STUDENT,
    assign_folds,
    cv_crystals,
    cv_summary,
    make_folds,
    molecule_groups,
)
from kd_nnp.evaluation.stats import bootstrap_ci


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


TINY = [
    "teacher=chgnet", "cv.codes=[TEPNIT02,TEPNIT12,UREAXX02]", "cv.max_atoms=16",
    "cv.folds=2", "cv.workers=1", "cv.bootstrap=500", "demo.frames.n_strain=2",
    "demo.frames.n_rattle=1", "demo.frames.prerelax_steps=0", "demo.relax.max_steps=5",
    "+demo.relax.fmax=0.2", "trainer.max_epochs=2", "data.grouped=false",
    "data.n_val=1", "trainer.enable_progress_bar=false", "validate_before_training=false",
]  # fmt: skip


@pytest.mark.slow  # ~60-90 s on 2 shared cores: 2 trainings, 9 short relaxations, then a resume
def test_cv_end_to_end_and_resume(tmp_path, monkeypatch):
    from kd_nnp.cli.evaluate import main
    from kd_nnp.data.store import FrameStore

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cv"
    argv = ["cv", f"cv.out={out}", f"paths.output_dir={tmp_path}", *TINY]
    assert main(argv) == 0
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

"""The generated-corpus learning curve (experiments/learning_curve/run.py): nested corpus
subsets without held-out molecules, arm stores holding exactly the demo's and the chosen
frames with their labels, the statistics per arm, refusals; (slow) the script end to end on a
tiny demo output and a tiny generated corpus, then rerun without recomputing anything."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from ase import Atoms

from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError
from kd_nnp.errors import KdNnpError
from kd_nnp.utils.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "learning_curve" / "run.py"


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("learning_curve_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _store(root, frames: dict[str, str], label_hash: str = "h1") -> FrameStore:
    """A store of one-atom-per-id toy frames ``{frame_id: group}`` with label set 'tt'
    (energy = the frame's index, so copies can be checked)."""
    s = FrameStore(root, create=True)
    fr = [
        Frame(
            fid,
            Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74 + 0.01 * i]], cell=[6] * 3, pbc=True),
            grp,
            "toy",
        )  # fmt: skip
        for i, (fid, grp) in enumerate(frames.items())
    ]
    s.add_frames(fr)
    ls = s.labels("tt", create=True)
    ls.set_provenance({"teacher": "tt", "hash": label_hash})
    ls.write([(f, Labels(float(i), np.zeros((2, 3)), np.zeros(6)), None, 0.0)
              for i, f in enumerate(fr)])  # fmt: skip
    return s


def _corpus(root, mols=("A", "B", "C", "D", "E"), label_hash="h1") -> FrameStore:
    ids = {f"gen:{m}/p{k}/s{j}": m for m in mols for k in range(2) for j in range(2)}
    return _store(root, ids, label_hash)


def test_counts_parsed_and_checked(lc):
    assert lc.parse_counts("25,0, 50") == [0, 25, 50]
    for bad in ("", "a,b", "-1", "3,3"):
        with pytest.raises(KdNnpError, match="--molecules"):
            lc.parse_counts(bad)


def test_corpus_order_is_seeded_nested_and_leaves_held_out_molecules(lc, tmp_path):
    gen = _corpus(tmp_path / "g")
    order, held = lc.corpus_order(gen, {"C", "Z"}, seed=0)
    assert held == ["C"] and sorted(order) == ["A", "B", "D", "E"]
    assert lc.corpus_order(gen, {"C"}, seed=0)[0] == order
    assert {tuple(lc.corpus_order(gen, {"C"}, seed=s)[0]) for s in range(8)} != {tuple(order)}


def test_arm_store_holds_the_demo_and_exactly_the_chosen_molecules(lc, tmp_path):
    demo = _store(tmp_path / "demo", {"X/p0": "X", "X/p1": "X", "Y/p0": "Y"})
    gen = _corpus(tmp_path / "g")
    out = lc.build_arm_store(tmp_path / "m2", demo, gen, ["D", "A"], "tt")
    s = FrameStore(out)
    want = ["X/p0", "X/p1", "Y/p0"] + [f"gen:{m}/p{k}/s{j}" for m in "AD" for k in (0, 1)
                                        for j in (0, 1)]  # fmt: skip
    assert sorted(s.frame_ids()) == sorted(want)
    labels = s.labels("tt").load()
    assert sorted(labels) == sorted(want)
    src = {**demo.labels("tt").load(), **gen.labels("tt").load()}
    assert all(labels[f].energy == src[f].energy for f in want)
    assert s.labels("tt").provenance["hash"] == "h1"
    assert lc.crystal_counts(s) == (4, 8)  # A/p0, A/p1, D/p0, D/p1; 2 frames each
    assert not (tmp_path / "m2.tmp").exists()
    # the same call again reuses it; another subset into the same folder is refused
    assert lc.build_arm_store(tmp_path / "m2", demo, gen, ["A", "D"], "tt") == out
    with pytest.raises(KdNnpError, match="another subset"):
        lc.build_arm_store(tmp_path / "m2", demo, gen, ["A", "B"], "tt")
    # a corpus labelled by another teacher (other provenance hash) is refused before writing
    other = _corpus(tmp_path / "g2", label_hash="h2")
    with pytest.raises(StoreError, match="differs between"):
        lc.build_arm_store(tmp_path / "m9", demo, other, ["A"], "tt")
    assert not (tmp_path / "m9").exists()


def test_method_rows_recompute_the_table(lc):
    rows = []
    for method, errs in {"s": [1.0, -3.0, 2.0], "teacher (t)": [0.5, -1.0, 4.0]}.items():
        for cid, e in zip("abc", errs, strict=True):
            rows.append({"method": method, "id": cid, "status": "ok", "failure": "",
                         "vol_err_pct": e, "density_err": 0.0, "converged": True})  # fmt: skip
    rows.append({"method": "s", "id": "d", "status": "error", "failure": "error",
                 "vol_err_pct": np.nan, "density_err": np.nan, "converged": False})  # fmt: skip
    st = lc.method_rows(pd.DataFrame(rows), "teacher (t)")
    s = st["s"]
    assert (s["n"], s["n_crystals"], s["failures"]) == (3, 4, 1)
    assert s["vol_mae_pct"] == pytest.approx(2.0) and s["vol_mean_pct"] == pytest.approx(0.0)
    assert s["to_teacher_pct"] == pytest.approx((0.5 + 2.0 + 2.0) / 3)
    lo, hi = s["vol_mae_ci95_pct"]
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert st["teacher (t)"]["to_teacher_pct"] == 0.0
    md = {"label": "s", "crystals": 4, "molecules": 2, "n_train": 10, "train_s": 1.0, **s}
    table = lc.markdown([md], {"teacher (t)": st["teacher (t)"]})
    assert "| s | 4 (2) | 10 | 1 | 3 | 1 | 2.00 [" in table


@pytest.mark.slow  # ~2-3 min on 2 shared cores: a tiny corpus, 2 short trainings, 3 relaxations
def test_learning_curve_end_to_end(lc, tmp_path, monkeypatch, small_crystals):
    from kd_nnp.cli import main as cli
    from kd_nnp.demo import write_molecule_list
    from kd_nnp.teachers.label import label_store

    monkeypatch.chdir(tmp_path)
    # a tiny "demo output": strained OXALAC11 frames labelled by the teacher, urea held out
    demo = tmp_path / "demo"
    store = FrameStore(demo / "store", create=True)
    ox = small_crystals["OXALAC11"]
    frames = []
    for k, f in enumerate((0.98, 1.0, 1.03, 1.06)):
        a = ox.copy()
        a.set_cell(a.cell * f, scale_atoms=True)
        frames.append(Frame(f"OXALAC11/p{k}", a, "OXALAC11", "demo-perturb"))
    store.add_frames(frames)
    label_store(demo / "store", "chgnet", workers=1)
    (demo / "crystals.json").write_text(json.dumps({"eval": ["UREAXX02"], "train": ["OXALAC11"]}))
    held = write_molecule_list(demo / "heldout_molecules.json", [small_crystals["UREAXX02"]])
    # a tiny corpus: formamide and urea, 1 packing each, a few teacher steps
    gen = tmp_path / "gen"
    assert cli(["data", "generate", "--out", str(gen), "--teacher", "chgnet", "--packings", "1",
                "--relax-steps", "4", "--keep-every", "2", "--molecules", "FORMAM", "UREAXX02",
                "--space-groups", "14,2", "--space-group-weights", "1,1",
                "--workers", "1"]) == 0  # fmt: skip
    corpus = FrameStore(gen)
    groups = sorted({f.group_id for f in corpus.iter_frames()})
    assert held[0] in groups and len(groups) == 2  # urea was generated too: it must not count
    form = next(g for g in groups if g != held[0])

    out = tmp_path / "lc"
    argv = ["--demo-out", str(demo), "--generated", str(gen), "--molecules", "0,1",
            "--out", str(out), "--workers", "1", "teacher=chgnet", "trainer.max_epochs=2",
            "data.grouped=false", "data.n_val=1", "demo.relax.max_steps=5",
            "+demo.relax.fmax=0.2", "trainer.enable_progress_bar=false",
            "validate_before_training=false"]  # fmt: skip
    res = lc.run(argv)
    assert res["held_out_corpus_molecules"] == [held[0]]
    a0, a1 = res["arms"]
    n_form = sum(1 for f in corpus.iter_frames() if f.group_id == form)
    assert (a0["molecules"], a0["crystals"], a0["frames_generated"]) == (0, 0, 0)
    assert (a1["molecules"], a1["crystals"], a1["frames_generated"]) == (1, 1, n_form)
    assert a1["n_train"] + a1["n_val"] == 4 + n_form and a0["n_train"] + a0["n_val"] == 4
    summ = json.loads((out / "m1" / "train" / "data_summary.json").read_text())
    assert set(summ["train_groups"]) | set(summ["val_groups"]) == {"OXALAC11", form}
    per = pd.read_csv(out / "per_crystal.csv")
    t = per[per["method"] == "teacher (chgnet)"].set_index("id")["vol_err_pct"]
    for arm in (a0, a1):
        s = per[per["method"] == arm["label"]].set_index("id")["vol_err_pct"]
        assert list(s.index) == ["UREAXX02"]
        assert arm["vol_mae_pct"] == pytest.approx(abs(s["UREAXX02"]))
        assert arm["to_teacher_pct"] == pytest.approx(abs(s["UREAXX02"] - t["UREAXX02"]))
    # lattice energies of every method from the same relaxed crystals; teacher = reference
    lat = pd.read_csv(out / "lattice" / "table.csv").set_index("crystal")
    for arm in (a0, a1):
        want = abs(lat.loc["UREAXX02", arm["label"]] - lat.loc["UREAXX02", "teacher (chgnet)"])
        assert arm["lattice_mae_vs_teacher"] == pytest.approx(want)
    assert res["baselines"]["teacher (chgnet)"]["lattice_mae_vs_teacher"] == 0.0
    assert lat.loc["UREAXX02", "teacher (chgnet)"] < 0  # bound
    assert (out / "learning_curve.png").stat().st_size > 5000
    assert "+1 generated molecules" in (out / "learning_curve.md").read_text()

    # a rerun recomputes nothing; another corpus into the same --out is refused
    stamp = (out / "m1" / "train" / "metrics.json").stat().st_mtime_ns
    again = lc.run(argv)
    assert (out / "m1" / "train" / "metrics.json").stat().st_mtime_ns == stamp
    assert again["arms"][1]["vol_mae_pct"] == pytest.approx(a1["vol_mae_pct"])
    other = ["--generated" if x == "--generated" else x for x in argv]
    other[other.index("--generated") + 1] = str(demo / "store")
    with pytest.raises(KdNnpError, match="another demo, corpus or seed"):
        lc.run(other)

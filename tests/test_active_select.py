"""Active selection of what the teacher labels (issue 12): ``kd-nnp label ... select.n=N``
labels only the frames a random or committee-disagreement round picks, records every round in
``labels/<name>.select.jsonl``, resumes a killed round with the same picks and refuses a rerun
with other inputs."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from kd_nnp.cli import main as kd_main
from kd_nnp.data.sources.perturb import make_perturbations
from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
from kd_nnp.data.store import FrameStore, StoreError
from kd_nnp.errors import SettingsError
from kd_nnp.teachers.label import label_store
from kd_nnp.teachers.select import (
    SelectionError,
    SelectSettings,
    journal_path,
)
from kd_nnp.utils.jsonl import read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore")

TEACHER = "test_teachers_label:slow_emt"  # EMT: cheap, H C N O
KW = dict(progress=False, check=False, name="emt")


@pytest.fixture
def pool(tmp_path):
    fs = FrameStore(tmp_path / "pool", create=True)
    frames = pyxtal_frames("test", codes=["UREAXX02", "FORMAM"])
    fs.add_frames(make_perturbations(frames, n_strain=4, n_rattle=3, seed=2))
    assert len(fs) == 16
    return fs


@pytest.fixture(scope="module")
def committee_file(tmp_path_factory, chgnet_model):
    """A committee file of 2 heads: the pretrained MLP with two seeded perturbations."""
    from kd_nnp.teachers.committee import committee_blob

    heads = []
    for seed in (0, 1):
        h = copy.deepcopy(chgnet_model.mlp)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        heads.append(h)
    path = tmp_path_factory.mktemp("committee") / "student.pt"
    torch.save(committee_blob(chgnet_model, heads, {}, {"head_seeds": [0, 1]}), path)
    return path


def _disagreement_by_heads(path, fs: FrameStore, ids: list[str]) -> dict[str, float]:
    """Energy std per atom of the heads, each run as its own plain CHGNet (independent of the
    committee calculator that selection uses)."""
    from pymatgen.io.ase import AseAtomsAdaptor

    from kd_nnp.teachers.committee import head_model

    blob = torch.load(path, map_location="cpu", weights_only=False)
    models = [head_model(blob, k) for k in (0, 1)]
    out = {}
    for fr in fs.iter_frames(ids):
        s = AseAtomsAdaptor.get_structure(fr.atoms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e = [float(m.predict_structure(s, task="e")["e"]) for m in models]  # eV/atom
        out[fr.frame_id] = float(np.std(e))
    return out


def _sel(n, **kw) -> SelectSettings:
    return SelectSettings(n=n, **kw)


def test_committee_round_labels_the_highest_disagreement_frames(pool, committee_file):
    rep0 = label_store(pool.root, TEACHER, select=_sel(3, seed=4), **KW)
    labels = pool.labels("emt")
    first = set(labels.status())
    assert rep0.n_ok == 3 and len(first) == 3

    com = _sel(7, by="committee", committee=str(committee_file))
    rep1 = label_store(pool.root, TEACHER, select=com, **KW)
    assert rep1.n_ok == 4
    rest = [i for i in pool.frame_ids() if i not in first]
    scores = _disagreement_by_heads(committee_file, pool, rest)
    ranked = sorted(rest, key=lambda i: -scores[i])
    assert scores[ranked[3]] - scores[ranked[4]] > 1e-5  # a clear cut between picked and not
    status = labels.status()
    assert set(status) == first | set(ranked[:4])  # labels only for the picked frames
    assert set(labels.load()) == set(status)

    rounds = read_jsonl(journal_path(labels))
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["by"] == "random" and set(rounds[0]["picks"]) == first
    r1 = rounds[1]
    assert r1["picks"] == ranked[:4] and r1["n_held_before"] == 3 and r1["n_pool"] == 13
    np.testing.assert_allclose(r1["scores"], [scores[i] for i in ranked[:4]], rtol=2e-3)
    assert r1["pool_scores"]["n"] == 13
    # the teacher's labels are EMT's on exactly those frames
    from ase.calculators.emt import EMT

    fid = ranked[0]
    a = pool.get(fid).atoms
    a.calc = EMT()
    assert labels.load([fid])[fid].energy == pytest.approx(a.get_potential_energy(), abs=1e-8)

    # rerunning a finished round's command does nothing and records nothing
    again = label_store(pool.root, TEACHER, select=com, **KW)
    assert again.n_todo == 0 and len(read_jsonl(journal_path(labels))) == 2

    # max_per_group=2: at most 2 frames of a crystal (3 of the top 4 are urea's here)
    cap = _sel(7, by="committee", committee=str(committee_file), max_per_group=2)
    label_store(pool.root, TEACHER, select=_sel(3, seed=4), **dict(KW, name="cap"))
    label_store(pool.root, TEACHER, select=cap, **dict(KW, name="cap"))
    group = {f.frame_id: f.group_id for f in pool.iter_frames()}
    urea = [i for i in ranked if group[i] == "UREAXX02"][:2]
    want = [i for i in ranked if i in urea or group[i] == "FORMAM"][:4]
    assert sum(group[i] == "UREAXX02" for i in ranked[:4]) == 3
    assert read_jsonl(journal_path(pool.labels("cap")))[1]["picks"] == want
    assert want != ranked[:4]  # the cap changed the picks here


def test_random_rounds_are_seeded(pool):
    a = label_store(pool.root, TEACHER, select=_sel(5, seed=7), **dict(KW, name="a"))
    b = label_store(pool.root, TEACHER, select=_sel(5, seed=7), **dict(KW, name="b"))
    c = label_store(pool.root, TEACHER, select=_sel(5, seed=8), **dict(KW, name="c"))
    assert a.n_ok == b.n_ok == c.n_ok == 5
    picks = {k: read_jsonl(journal_path(pool.labels(k)))[0]["picks"] for k in "abc"}
    assert picks["a"] == picks["b"] != picks["c"]
    assert set(pool.labels("a").status()) == set(picks["a"])
    # pinned: a change of the draw would silently change every random arm
    ids = pool.frame_ids()
    want = [ids[i] for i in np.random.default_rng([7, 0]).choice(16, size=5, replace=False)]
    assert picks["a"] == want
    # round 1 draws from what is left, with its own stream
    label_store(pool.root, TEACHER, select=_sel(9, seed=7), **dict(KW, name="a"))
    r1 = read_jsonl(journal_path(pool.labels("a")))[1]
    assert len(r1["picks"]) == 4 and not set(r1["picks"]) & set(picks["a"])
    assert r1["n_pool"] == 11


def test_interrupted_round_resumes_with_its_picks(pool, committee_file):
    com = _sel(6, by="committee", committee=str(committee_file))
    label_store(pool.root, TEACHER, select=_sel(2, seed=1), **KW)
    cut = label_store(pool.root, TEACHER, select=com, limit=1, **KW)  # killed after 1 label
    assert cut.n_ok == 1
    labels = pool.labels("emt")
    picks = read_jsonl(journal_path(labels))[1]["picks"]
    assert len(picks) == 4 and picks[0] in labels.status()
    # another request while the round is unfinished is refused, naming the round's settings
    with pytest.raises(SelectionError, match=r"round 1 .*select.n=6 select.by=committee"):
        label_store(pool.root, TEACHER, select=_sel(8, by="committee",
                                                    committee=str(committee_file)), **KW)  # fmt: skip
    with pytest.raises(SelectionError, match="unfinished"):
        label_store(pool.root, TEACHER, select=_sel(6, seed=1), **KW)
    done = label_store(pool.root, TEACHER, select=com, **KW)
    assert done.n_ok == 3  # the 3 picks left, not a rescored pool (which lost picks[0])
    rounds = read_jsonl(journal_path(labels))
    assert len(rounds) == 2 and rounds[1]["picks"] == picks
    assert set(labels.status()) == set(rounds[0]["picks"]) | set(picks)


def test_label_set_changed_under_an_unfinished_round_is_refused(pool):
    com = _sel(5, seed=2)
    label_store(pool.root, TEACHER, select=com, limit=2, **KW)
    picks = read_jsonl(journal_path(pool.labels("emt")))[0]["picks"]
    other = next(i for i in pool.frame_ids() if i not in picks)
    label_store(pool.root, TEACHER, select=None, limit=None, **dict(KW, name="tmp"))
    fr = pool.get(other)
    lab = pool.labels("tmp").load([other])[other]
    pool.labels("emt").write([(fr, lab, None, 0.0)])  # labelled behind the round's back
    with pytest.raises(SelectionError, match="changed since round 0"):
        label_store(pool.root, TEACHER, select=com, **KW)


def test_settings_and_cli_refusals(pool, tmp_path, capsys):
    with pytest.raises(SettingsError, match="select.committee=PATH"):
        SelectSettings(n=3, by="committee")
    with pytest.raises(SettingsError, match="select.by"):
        SelectSettings(n=3, by="uncertainty")
    with pytest.raises(SettingsError, match="select.n must be >= 1"):
        SelectSettings(n=0)
    with pytest.raises(SettingsError, match="max_per_group must be >= 1"):
        SelectSettings(n=2, max_per_group=0)
    with pytest.raises(StoreError, match="cannot run on one shard"):
        label_store(pool.root, TEACHER, select=_sel(3), shard=(0, 2), **KW)
    with pytest.raises(SelectionError, match="no committee file"):
        label_store(pool.root, TEACHER, select=_sel(3, by="committee",
                                                    committee=str(tmp_path / "no.pt")), **KW)  # fmt: skip
    # through the verb: a user error is one line, exit 1; select.n labels the budget
    argv = ["label", f"store={pool.root}", "teacher=custom", f"teacher.name={TEACHER}",
            "teacher.check=false", "name=cli", "progress=false"]  # fmt: skip
    assert kd_main([*argv, "select.n=2", "select.by=committee"]) == 1
    assert "select.committee=PATH" in capsys.readouterr().err
    assert kd_main([*argv, "select.n=2", "select.seed=3"]) == 0
    assert len(pool.labels("cli").status()) == 2
    rec = read_jsonl(journal_path(pool.labels("cli")))
    assert len(rec) == 1 and rec[0]["seed"] == 3
    assert json.loads(json.dumps(rec[0]))["budget"] == 2


@pytest.mark.slow
def test_active_vs_random_experiment_end_to_end(pool, tmp_path):
    """experiments/active/run.py, 2 rounds per arm: both arms start from the same frames, the
    active arm's round 1 is ranked by round 0's committee, the random arm's by the seeded draw;
    a rerun adds nothing, other arguments are refused."""
    import importlib.util

    from kd_nnp.errors import KdNnpError
    from kd_nnp.teachers.select import file_sha256
    from kd_nnp.utils.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "active_run", REPO_ROOT / "experiments" / "active" / "run.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "out"
    argv = ["--pool", str(pool.root), "--out", str(out), "--eval-codes", "OXALAC11",
            "--teacher", "chgnet", "--initial", "4", "--step", "3", "--rounds", "2",
            "--epochs", "2", "--fmax", "0.1"]  # fmt: skip
    with pytest.raises(KdNnpError, match="occurs in the pool"):
        mod.main([*argv[:5], "UREAXX02"])
    assert mod.main(argv) == 0
    res = read_jsonl(out / "results.jsonl")
    assert [(r["arm"], r["round"], r["n_labelled"]) for r in res] == [
        ("active", 0, 4), ("active", 1, 7), ("random", 0, 4), ("random", 1, 7)]  # fmt: skip
    for r in res:
        assert r["n_ok"] == 1 and np.isfinite(r["vol_mae_pct"])
        assert r["vol_mae_pct"] == pytest.approx(abs(r["vol_err_pct"]["OXALAC11"]))
    (act_name,) = [n for n in pool.label_names() if n.endswith("_active")]
    act = read_jsonl(journal_path(pool.labels(act_name)))
    rnd = read_jsonl(journal_path(pool.labels(act_name.replace("_active", "_random"))))
    assert act[0]["picks"] == rnd[0]["picks"]  # same start
    assert act[1]["by"] == "committee" and rnd[1]["by"] == "random"
    assert act[1]["committee_sha256"] == file_sha256(out / "active" / "round0" / "student.pt")
    assert act[1]["scores"] == sorted(act[1]["scores"], reverse=True)
    assert act[1]["scores"][-1] >= act[1]["pool_scores"]["median"]
    assert mod.main(argv) == 0  # resumed: nothing new
    assert len(read_jsonl(out / "results.jsonl")) == 4
    assert len(read_jsonl(journal_path(pool.labels(act_name)))) == 2
    with pytest.raises(KdNnpError, match="other arguments"):
        mod.main([*argv[:-1], "0.05"])

"""`kd-nnp label ... shard=K/N` then `merge_shards=true`: shards of a label set labelled by
separate processes (one file each), joined into the label set without duplicates; a killed
shard resumes; inconsistent shards are refused naming the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kd_nnp.cli import main as kd_main
from kd_nnp.data.sources.merge import copy_labels, merge_stores
from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError
from kd_nnp.errors import SettingsError
from kd_nnp.teachers.label import label_store, merge_label_shards
from kd_nnp.utils.paths import REPO_ROOT
from kd_nnp.utils.shard import parse_shard, shard_of

TESTS = Path(__file__).resolve().parent
TEACHER = "test_teachers_label:slow_emt"  # EMT with a log of every computed frame
KW = dict(progress=False, check=False)


@pytest.fixture
def store(urea_perturbations_store) -> FrameStore:
    return urea_perturbations_store


def _env() -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS)]), OMP_NUM_THREADS="1"
    )


def _rows(path: Path) -> list[str]:
    """frame ids of every labelled row of a label-set file (duplicates show up twice)."""
    from ase.db import connect

    return [r.frame_id for r in connect(str(path)).select()]


def test_shard_spec_one_parser_zero_based():
    assert parse_shard("0/16") == (0, 16) and parse_shard("15/16") == (15, 16)
    assert parse_shard(" 0/1 ") == (0, 1)
    for bad in ("16/16", "-1/4", "1/0", "a/2", "3", "1/2/3", ""):
        with pytest.raises(SettingsError, match="shard must be K/N"):
            parse_shard(bad)
    # data generate's --shard uses the same parser (argparse exits 2 with its message)
    with pytest.raises(SystemExit) as exc:
        kd_main(["data", "generate", "--out", "x", "--teacher", "chgnet", "--shard", "2/2"])
    assert exc.value.code == 2


def test_shard_of_is_a_stable_hash_of_the_id():
    # pinned values: changing the function would move labelled frames to other shards
    assert [shard_of(f"f/{i}", 16) for i in range(8)] == [0, 14, 9, 11, 2, 4, 13, 0]
    assert shard_of("UREAXX02/s0", 16) == 8
    counts = np.bincount([shard_of(f"crystal/{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900 and counts.max() < 1100, counts  # balanced
    assert {shard_of(f"crystal/{i}", 1) for i in range(50)} == {0}


def test_two_shards_merged_equal_the_unsharded_labels(store: FrameStore, tmp_path: Path):
    reps = [label_store(store.root, TEACHER, name="emt", shard=(k, 2), **KW) for k in (0, 1)]
    ids = store.frame_ids()
    slices = [{f for f in ids if shard_of(f, 2) == k} for k in (0, 1)]
    assert all(s for s in slices) and slices[0].isdisjoint(slices[1])
    for k, rep in enumerate(reps):
        assert rep.n_frames == rep.n_ok == len(slices[k]) and rep.n_failed == 0
        path = store.root / "labels" / "shards" / "emt" / f"{k}-of-2.db"
        assert rep.path == path and sorted(_rows(path)) == sorted(slices[k])
    assert store.label_names() == []  # shards are not label sets until merged
    # a rerun of a finished shard labels nothing
    assert label_store(store.root, TEACHER, name="emt", shard=(1, 2), **KW).n_todo == 0
    merged = merge_label_shards(store.root, "emt")
    assert (merged.n_shards, merged.n_written, merged.n_ok, merged.n_failed) == (2, 12, 12, 0)
    assert store.label_names() == ["emt"]
    assert sorted(_rows(store.labels("emt").path)) == sorted(ids)  # each frame once
    label_store(store.root, TEACHER, name="ref", **KW)  # unsharded
    got, ref = store.labels("emt").load(), store.labels("ref").load()
    assert set(got) == set(ref) == set(ids)
    for fid in ids:
        assert got[fid].energy == ref[fid].energy
        np.testing.assert_array_equal(got[fid].forces, ref[fid].forces)
        np.testing.assert_array_equal(got[fid].stress, ref[fid].stress)
    # the shared copy, a few rows per transaction, gives the same rows
    batched = store.labels("batched", create=True)
    assert copy_labels(batched, [(store, store.labels("ref"))], batch=5) == 12
    assert sorted(_rows(batched.path)) == sorted(ids)
    assert {f: v.energy for f, v in batched.load().items()} == {f: v.energy for f, v in ref.items()}
    prov, ref_prov = store.labels("emt").provenance, store.labels("ref").provenance
    assert prov["hash"] == ref_prov["hash"] and prov["shards"] == 2
    assert prov["name"] == TEACHER and prov["label_set"] == "emt"
    # merging again writes nothing; the label set then counts as done for the shards
    assert merge_label_shards(store.root, "emt").n_written == 0
    assert len(_rows(store.labels("emt").path)) == 12
    # `data merge` copies the merged set; shards not merged yet would be lost: refused
    rep = merge_stores(tmp_path / "copy", [store.root])
    assert rep.labels_written == {"batched": 12, "emt": 12, "ref": 12}
    label_store(store.root, TEACHER, name="late", shard=(0, 2), **KW)
    with pytest.raises(StoreError, match=r"label shard .*late/0-of-2\.db holds labels"):
        merge_stores(tmp_path / "copy2", [store.root])


def test_killed_shard_resumes_and_merge_waits_for_it(store: FrameStore, tmp_path: Path):
    """SIGKILL one shard's `kd-nnp label` mid-run: merging is refused naming the unfinished
    shard file, the rerun finishes it without labelling a frame twice, the merge is complete."""
    log = tmp_path / "computed.log"
    settings = {"log": str(log), "delay": 0.2}  # the same teacher settings in every shard
    label_store(store.root, TEACHER, name="emt", shard=(1, 2), settings=settings, **KW)
    ids = store.frame_ids()
    mine = [f for f in ids if shard_of(f, 2) == 0]
    args = [
        sys.executable, "-m", "kd_nnp.cli", "label", f"store={store.root}", "teacher=custom",
        f"teacher.name={TEACHER}", "teacher.check=false", f"+teacher.log={log}",
        "+teacher.delay=0.2", "name=emt", "shard=0/2", "progress=false",
    ]  # fmt: skip
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shard0 = store.label_shard("emt", 0, 2)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if shard0.path.exists() and len(shard0.status()) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"label run ended early: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_first = len(shard0.status())
    assert 2 <= n_first < len(mine), "the shard was not killed mid-way"
    with pytest.raises(StoreError, match=r"0-of-2\.db lacks \d+ frames of shard 0/2"):
        merge_label_shards(store.root, "emt")
    assert store.label_names() == []  # refused before writing anything
    # resume through the CLI (the kill left no lock behind)
    assert kd_main(args[3:]) == 0
    # each shard job logs into its own run folder (array tasks start in the same second)
    logs = sorted(p.name for p in (store.root / "logs" / "label").iterdir())
    assert len(logs) == 2 and all(n.endswith("_shard-0-of-2") for n in logs), logs
    assert all((store.root / "logs" / "label" / n / "label.log").is_file() for n in logs)
    assert sorted(_rows(shard0.path)) == sorted(mine)  # one row per frame
    computed = log.read_text().split()
    # every frame once; at most the one in flight at the kill computed twice
    assert len(ids) <= len(computed) <= len(ids) + 1
    assert kd_main(["label", f"store={store.root}", "teacher=custom",
                    f"teacher.name={TEACHER}", "name=emt", "merge_shards=true"]) == 0  # fmt: skip
    assert sorted(_rows(store.labels("emt").path)) == sorted(ids)


def test_merge_refuses_inconsistent_shards(store: FrameStore, capsys):
    label_store(store.root, TEACHER, name="emt", shard=(0, 2), **KW)
    # a missing shard: named
    with pytest.raises(StoreError, match=r"1 of 2 shard files missing \(.*/1-of-2\.db\)"):
        merge_label_shards(store.root, "emt")
    # another N for the same label set: refused before labelling
    with pytest.raises(StoreError, match=r"holds shards of 2 .*shard 0/3"):
        label_store(store.root, TEACHER, name="emt", shard=(0, 3), **KW)
    # a shard made with other teacher settings: refused when merging, naming both files
    label_store(store.root, TEACHER, name="emt", shard=(1, 2), settings={"scale": 2.0}, **KW)
    with pytest.raises(StoreError, match=r"label set 'emt' differs between .*0-of-2\.db.*1-of-2"):
        merge_label_shards(store.root, "emt")
    assert store.label_names() == []
    store.label_shard("emt", 1, 2).path.unlink()
    label_store(store.root, TEACHER, name="emt", shard=(1, 2), **KW)
    with pytest.raises(StoreError, match=r"labelled by teacher 'test_teachers_label:slow_emt', "):
        merge_label_shards(store.root, "emt", teacher="test_teachers:emt")
    assert merge_label_shards(store.root, "emt", teacher=TEACHER).n_written == 12
    # no shards at all
    with pytest.raises(StoreError, match="no shards of label set 'other'"):
        merge_label_shards(store.root, "other")
    # a stray file name in the shard folder
    (store.shard_dir("emt") / "3-of-2.db").write_text("")
    with pytest.raises(StoreError, match=r"3-of-2\.db: not a shard file"):
        merge_label_shards(store.root, "emt")
    # CLI: bad specs are one-line errors (exit 1)
    base = ["label", f"store={store.root}", "teacher=custom", f"teacher.name={TEACHER}"]
    logs = store.root / "logs"
    assert kd_main([*base, "shard=2/2"]) == 1
    assert "shard must be K/N with 0 <= K < N, got 2/2" in capsys.readouterr().err
    assert not logs.exists()  # refused before Hydra made a run folder
    assert kd_main([*base, "shard=0/2", "merge_shards=true"]) == 1
    assert "give one of them" in capsys.readouterr().err


def test_shard_refuses_a_teacher_other_than_the_label_sets(store: FrameStore):
    label_store(store.root, TEACHER, name="emt", limit=3, **KW)  # started unsharded
    with pytest.raises(StoreError, match="other teacher settings"):
        label_store(store.root, TEACHER, name="emt", shard=(0, 2), settings={"scale": 2.0}, **KW)
    # frames the label set holds are not labelled again by the shards
    reps = [label_store(store.root, TEACHER, name="emt", shard=(k, 2), **KW) for k in (0, 1)]
    assert sum(r.n_done_before for r in reps) == 3 and sum(r.n_ok for r in reps) == 9
    assert merge_label_shards(store.root, "emt").n_written == 9
    assert sorted(_rows(store.labels("emt").path)) == sorted(store.frame_ids())


def _frame(fid: str) -> Frame:
    from ase.build import bulk

    return Frame(fid, bulk("Si", "diamond", a=5.43), "g", "test")


def _labelled(root: Path, energy: float) -> Path:
    fs = FrameStore(root, create=True)
    fr = _frame("x/0")
    fs.add_frames([fr])
    ls = fs.labels("so3lr", create=True)
    ls.set_provenance({"name": "so3lr", "hash": "h1"})
    ls.write([(fr, Labels(energy, np.zeros((2, 3)), np.zeros(6)), None, 1.0)])
    return root


def test_merge_refuses_a_frame_labelled_twice_differently(tmp_path: Path):
    """`kd-nnp data merge` kept the first source's labels of a frame two sources labelled
    differently (the same teacher hash), silently; identical labels are kept once."""
    a, same = _labelled(tmp_path / "a", -1.0), _labelled(tmp_path / "same", -1.0)
    rep = merge_stores(tmp_path / "m", [a, same])
    assert rep.labels_written == {"so3lr": 1}
    assert _rows(tmp_path / "m" / "labels" / "so3lr.db") == ["x/0"]
    other = _labelled(tmp_path / "other", -2.0)
    with pytest.raises(StoreError, match=r"frame 'x/0' .* other labels in .*other"):
        merge_stores(tmp_path / "m2", [a, other])
    # labels replace a failure of the target; a failure never replaces labels
    fs = FrameStore(tmp_path / "f", create=True)
    fs.add_frames([_frame("x/0")])
    target = fs.labels("so3lr", create=True)
    target.write([(_frame("x/0"), None, "exploded", 1.0)])
    failed_src = FrameStore(tmp_path / "f2", create=True)
    failed_src.add_frames([_frame("x/0")])
    failed_src.labels("so3lr", create=True).write([(_frame("x/0"), None, "again", 1.0)])
    assert copy_labels(target, [(failed_src, failed_src.labels("so3lr"))]) == 0
    assert copy_labels(target, [(FrameStore(a), FrameStore(a).labels("so3lr"))]) == 1
    assert target.status() == {"x/0": "ok"} and target.failures() == {}
    assert copy_labels(target, [(failed_src, failed_src.labels("so3lr"))]) == 0
    assert target.load()["x/0"].energy == -1.0

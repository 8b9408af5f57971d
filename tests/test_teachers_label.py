"""`kd-nnp label`: soft labels with provenance, failures recorded, two teachers in one store,
and resumability after a kill (no frame computed twice, none lost)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
from kd_nnp.data.store import FrameStore, StoreError
from kd_nnp.teachers.label import label_store
from kd_nnp.utils.paths import REPO_ROOT

TESTS = Path(__file__).resolve().parent


def atoms_key(atoms) -> str:
    return hashlib.sha1(np.round(atoms.positions, 6).tobytes()).hexdigest()[:12]


class SlowEMT(Calculator):
    """EMT that sleeps and logs every completed computation (to detect recomputation)."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(
        self,
        delay: float = 0.0,
        log: str = "",
        scale: float = 1.0,
        bad_above: float = 0.0,
        fail_flag: str = "",
    ) -> None:
        super().__init__()
        self.delay, self.log, self.scale, self.bad_above = delay, log, scale, bad_above
        self.fail_flag = fail_flag  # bad_above applies only while this file exists

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        time.sleep(self.delay)
        vol = a.get_volume() / len(a)
        if self.fail_flag and not os.path.exists(self.fail_flag):
            vol = 0.0
        if self.bad_above and vol > self.bad_above * 1.05:
            raise RuntimeError("teacher exploded on an expanded cell")
        if self.bad_above and vol > self.bad_above:
            f = f * np.nan
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(atoms_key(a) + "\n")
        self.results = {
            "energy": e * self.scale,
            "forces": f * self.scale,
            "stress": s * self.scale,
        }


def slow_emt(
    delay: float = 0.0,
    log: str = "",
    scale: float = 1.0,
    bad_above: float = 0.0,
    fail_flag: str = "",
) -> SlowEMT:
    return SlowEMT(delay, log, scale, bad_above, fail_flag)


@pytest.fixture
def store(urea_perturbations_store) -> FrameStore:
    return urea_perturbations_store


def test_label_two_teachers_coexist_with_provenance(store: FrameStore):
    rep = label_store(store.root, "test_teachers_label:slow_emt", name="emt", progress=False)
    assert rep.n_ok == 12 and rep.n_failed == 0
    rep2 = label_store(
        store.root,
        "test_teachers_label:slow_emt",
        settings={"scale": 2.0},
        name="emt2",
        progress=False,
        check=False,
    )
    assert rep2.n_ok == 12
    assert store.label_names() == ["emt", "emt2"]
    a, b = store.labels("emt").load(), store.labels("emt2").load()
    assert set(a) == set(store.frame_ids()) == set(b)
    fid = store.frame_ids()[3]
    atoms = store.get(fid).atoms
    atoms.calc = EMT()
    assert a[fid].energy == pytest.approx(atoms.get_potential_energy())
    np.testing.assert_allclose(a[fid].stress, atoms.get_stress(), atol=1e-10)
    assert b[fid].energy == pytest.approx(2 * a[fid].energy)
    prov = store.labels("emt").provenance
    assert prov["name"] == "test_teachers_label:slow_emt" and prov["settings"]["scale"] == 1.0
    assert (
        prov["check"]["stress_checks"] and prov["hash"] != store.labels("emt2").provenance["hash"]
    )
    # other settings under an existing label-set name are refused
    with pytest.raises(StoreError, match="other teacher settings"):
        label_store(
            store.root,
            "test_teachers_label:slow_emt",
            settings={"scale": 3.0},
            name="emt",
            progress=False,
            check=False,
        )
    # hard labels are untouched (perturbed frames have none)
    assert all(f.hard is None for f in store.iter_frames())


def test_label_set_name_agrees_with_training(store: FrameStore):
    """`kd-nnp label teacher=custom teacher.name=pkg.mod:factory` writes the set under
    label_set_name(spec); training with data.label_set=${teacher.name} (the spec) finds it,
    and a missing set is reported with the sets the store has."""
    from kd_nnp.teachers.label import label_set_name, resolve_label_set
    from kd_nnp.training.data import FramesDataModule

    spec = "test_teachers_label:slow_emt"
    assert label_set_name(spec) == "test_teachers_label_slow_emt"
    assert label_set_name("so3lr") == "so3lr"
    assert label_set_name("mace.calculators:mace_off") == "mace_calculators_mace_off"
    rep = label_store(store.root, spec, progress=False, check=False)
    assert rep.name == label_set_name(spec) and store.label_names() == [label_set_name(spec)]
    assert resolve_label_set(store, spec) == label_set_name(spec)
    assert resolve_label_set(store, label_set_name(spec)) == label_set_name(spec)
    dm = FramesDataModule(str(store.root), label_set=spec, grouped=False, n_val=2, reference="none")
    dm.setup("fit")
    assert dm.label_set == label_set_name(spec) and dm.available()[("soft", "energy")] == 10
    with pytest.raises(
        StoreError, match=r"no label set 'so3lr' \(have: \['test_teachers_label_slow_emt'\]\)"
    ):
        FramesDataModule(str(store.root), label_set="so3lr", grouped=False, n_val=2).setup()


def test_failures_recorded_not_written(store: FrameStore):
    vols = sorted(f.atoms.get_volume() / len(f.atoms) for f in store.iter_frames())
    thr = vols[-4]  # the most expanded frames fail (NaN or exception)
    rep = label_store(
        store.root,
        "test_teachers_label:slow_emt",
        settings={"bad_above": thr},
        name="flaky",
        progress=False,
        check=False,
    )
    ls = store.labels("flaky")
    assert rep.n_failed == 3 and rep.n_ok == 9
    fails = ls.failures()
    assert len(fails) == 3 and len(ls.load()) == 9
    assert any("non-finite" in e for e in fails.values())
    # rerun: failures are not retried unless asked
    assert (
        label_store(
            store.root,
            "test_teachers_label:slow_emt",
            settings={"bad_above": thr},
            name="flaky",
            progress=False,
            check=False,
        ).n_todo
        == 0
    )
    assert (
        label_store(
            store.root,
            "test_teachers_label:slow_emt",
            settings={"bad_above": thr},
            name="flaky",
            progress=False,
            check=False,
            retry_failed=True,
        ).n_todo
        == 3
    )


def test_label_cli_killed_and_resumed(store: FrameStore, tmp_path: Path):
    log = tmp_path / "computed.log"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS)]), OMP_NUM_THREADS="1"
    )
    args = [
        sys.executable,
        "-m",
        "kd_nnp.cli",
        "label",
        f"store={store.root}",
        "teacher=custom",
        "teacher.name=test_teachers_label:slow_emt",
        "teacher.check=false",
        f"+teacher.log={log}",
        "+teacher.delay=0.4",
        "name=slow",
        "progress=false",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ls_path = store.root / "labels" / "slow.db"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (
                ls_path.exists()
                and sum(v == "ok" for v in store.labels("slow").status().values()) >= 3
            ):
                break
            if proc.poll() is not None:
                pytest.fail(f"label run ended early: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    n_first = len(store.labels("slow").status())
    assert 3 <= n_first < 12, "the run was not interrupted mid-way"
    # resume with two worker processes
    out = subprocess.run(
        args[:-1] + ["progress=false", "workers=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    status = store.labels("slow").status()
    assert len(status) == 12 and set(status.values()) == {"ok"}
    computed = log.read_text().split()
    keys = {atoms_key(f.atoms) for f in store.iter_frames()}
    assert len(computed) == 12 and set(computed) == keys, "a frame was computed twice or lost"
    # exactly one row per frame in the label set
    assert len(list(store.labels("slow")._db().select())) == 12


def _label_args(store: FrameStore, log: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kd_nnp.cli",
        "label",
        f"store={store.root}",
        "teacher=custom",
        "teacher.name=test_teachers_label:slow_emt",
        "teacher.check=false",
        f"+teacher.log={log}",
        *extra,
        "name=twice",
        "progress=false",
    ]


def _env() -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS)]), OMP_NUM_THREADS="1"
    )


def test_two_concurrent_label_runs_label_each_frame_once(store: FrameStore, tmp_path: Path):
    """D2: two `kd-nnp label` runs on the same label set at once must not both label every
    frame (they used to: 2x rows, 2x compute, both rc 0). The second is refused while the
    first holds the label set."""
    log = tmp_path / "computed.log"
    args = _label_args(store, log, "+teacher.delay=1.0")
    procs = [
        subprocess.Popen(
            args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rcs = sorted(p.returncode for p in procs)
    text = "".join(o + e for o, e in outs)
    computed = log.read_text().split()
    assert len(computed) == 12 and len(set(computed)) == 12, "a frame was labelled twice"
    assert len(list(store.labels("twice")._db().select())) == 12
    assert rcs == [0, 1], text[-3000:]  # 12 s of labelling: the runs overlap
    assert "is being labelled by another process" in text


def test_label_help_lists_only_label_settings():
    """D18: `kd-nnp label --help` listed the training groups (trainer, loss, ...)."""
    out = subprocess.run(
        [sys.executable, "-m", "kd_nnp.cli", "label", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for group in ("trainer:", "loss:", "callbacks:", "experiment:", "student:"):
        assert group not in text, f"{group} listed in `label --help`"
    for teacher in sorted(p.stem for p in (REPO_ROOT / "conf" / "teacher").glob("*.yaml")):
        assert teacher in text
    assert "store: ???" in text and "retry_failed" in text and "teacher.name=" in text


def test_label_user_errors_are_one_line_and_create_nothing(tmp_path: Path, store, capsys):
    """D18: a mistyped store created STORE/logs/; teacher=custom without a name said '???'."""
    from kd_nnp.cli import main as kd_main

    missing = tmp_path / "stroe"
    assert kd_main(["label", f"store={missing}", "teacher=custom"]) == 1
    assert "not a kd_nnp frames store" in capsys.readouterr().err
    assert not missing.exists()
    assert kd_main(["label", f"store={store.root}", "teacher=custom"]) == 1
    err = capsys.readouterr().err
    assert "teacher.name=package.module:factory" in err and "???" not in err
    # a mistyped teacher: one line, nothing written into the store
    before = sorted(p.name for p in (store.root / "labels").iterdir())
    assert kd_main(["label", f"store={store.root}", "teacher=custom", "teacher.name=chgnett"]) == 1
    assert "unknown teacher 'chgnett'" in capsys.readouterr().err
    assert sorted(p.name for p in (store.root / "labels").iterdir()) == before
    assert store.label_names() == []


def test_retry_failed_supersedes_failures_and_ase_reads_labels(store: FrameStore, tmp_path: Path):
    """D12: after a successful retry_failed the failure rows stayed, and
    ase.io.read('labels/X.db@:') returned Atoms without labels."""
    import ase.io

    flag = tmp_path / "fail_now"
    flag.write_text("")
    vols = sorted(f.atoms.get_volume() / len(f.atoms) for f in store.iter_frames())
    settings = {"bad_above": vols[-4], "fail_flag": str(flag)}
    kw = dict(settings=settings, name="retry", progress=False, check=False)
    rep = label_store(store.root, "test_teachers_label:slow_emt", **kw)
    assert (rep.n_ok, rep.n_failed) == (9, 3)
    ls = store.labels("retry")
    assert len(ls.failures()) == 3
    path = ls.path
    atoms = ase.io.read(f"{path}@:")
    assert len(atoms) == 9  # only labelled frames; failures are kept aside
    flag.unlink()  # the teacher's trouble is fixed
    rep = label_store(store.root, "test_teachers_label:slow_emt", retry_failed=True, **kw)
    assert (rep.n_todo, rep.n_ok, rep.n_failed) == (3, 3, 0)
    assert ls.failures() == {} and set(ls.status().values()) == {"ok"}
    atoms = ase.io.read(f"{path}@:")
    assert len(atoms) == 12
    for a in atoms:  # every row read by ASE carries the teacher's labels
        assert np.isfinite(a.get_potential_energy())
        assert a.get_forces().shape == (len(a), 3) and a.get_stress().shape == (6,)
    ids = {r.frame_id for r in ls._db().select()}
    assert ids == set(store.frame_ids())


def test_labelling_names_frames_outside_the_organic_scope(tmp_path: Path, caplog):
    """D17: labelling a frame with elements outside H,C,N,O,P,S,F,Cl,Br,I said nothing."""
    import logging

    from kd_nnp.data.store import Frame

    fs = FrameStore(tmp_path / "st", create=True)
    frames = pyxtal_frames("test", codes=["UREAXX02"])
    odd = frames[0].atoms.copy()
    odd.numbers[0] = 29  # Cu
    fs.add_frames(frames + [Frame("odd/cu", odd, "odd", "test")])
    with caplog.at_level(logging.WARNING, logger="kd_nnp.teachers.label"):
        rep = label_store(fs.root, "test_teachers:emt", check=False, progress=False)
    assert rep.n_ok == 2
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("odd/cu (Cu)" in m and "outside the organic scope" in m for m in msgs), msgs
    assert not any(frames[0].frame_id in m for m in msgs)

"""The one calculator registry: spec grammar, unique labels, cheap checks, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kd_nnp.errors import KdNnpError
from kd_nnp.teachers.calculators import (
    check_spec,
    load_chgnet,
    make_calculator,
    method_label,
    unique_labels,
)
from kd_nnp.utils.paths import REPO_ROOT


def test_student_labels_come_from_the_run_folder(tmp_path):
    # every training run exports student.pt: the label must say which run
    assert method_label("student:runs/A/student.pt") == "student(A)"
    assert method_label("student:runs/B/student.pt") == "student(B)"
    assert method_label("student:runs/B/checkpoints/last.ckpt") == "student(B)"
    assert method_label("student:out/run3/model.pt") == "student(model)"
    assert method_label("student:runs/A/student.pt=soft-only") == "soft-only"
    # '=' inside a checkpoint name is part of the path, not a label
    assert method_label("student:ck/epoch=3-step=90.ckpt") == "student(epoch=3-step=90)"
    labels = unique_labels(["chgnet", "student:A/student.pt", "student:B/student.pt"])
    assert labels == {
        "chgnet": "CHGNet",
        "student:A/student.pt": "student(A)",
        "student:B/student.pt": "student(B)",
    }
    # a path that exists is taken whole, even with '=' in it (Hydra sweep folders)
    f = tmp_path / "loss.r_se=1" / "student.pt"
    f.parent.mkdir()
    f.write_bytes(b"")
    assert method_label(f"student:{f}") == "student(loss.r_se=1)"


def test_unique_labels_refuses_a_clash_naming_both():
    a, b = "student:x/run/student.pt", "student:y/run/student.pt"
    with pytest.raises(KdNnpError, match=r"'student:x/run/student.pt' and 'student:y/run/"):
        unique_labels([a, b])
    assert unique_labels([f"{a}=x", f"{b}=y"]) == {f"{a}=x": "x", f"{b}=y": "y"}
    with pytest.raises(KdNnpError, match="both get the label 'same'"):
        unique_labels([f"{a}=same", "teacher:so3lr=same", f"{b}=same"])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("chgnett", r"unknown calculator spec 'chgnett'.*student:PATH"),
        ("student:/no/such/student.pt", "no model file at /no/such/student.pt"),
        ("teacher:so3lrr", r"unknown teacher 'so3lrr'; built-in"),
        ("teacher:", "needs a teacher name"),
        ("no_such_module_xyz:factory", "cannot import 'no_such_module_xyz'"),
        ("ase.calculators.emt:NoSuchFactory", "has no callable 'NoSuchFactory'"),
        ("teachers:", "needs teachers with a positive weight"),
        ("teachers:so3lr", r"'so3lr' is not NAME=WEIGHT"),
        ("teachers:so3lr=1,chgnet_d3=x", r"weight of 'chgnet_d3' is not a number: 'x'"),
        ("teachers:so3lr=1,chgnet_d3=-1", r"weight of 'chgnet_d3' must be finite and >= 0"),
        ("teachers:so3lr=1,so3lr=2", "'so3lr' is given twice"),
        ("teachers:so3lr=0,chgnet_d3=0", "needs teachers with a positive weight"),
        ("teachers:so3lr=1,so3lrr=1", r"unknown teacher 'so3lrr'; built-in"),
    ],
)
def test_bad_specs_are_user_errors(spec, match):
    with pytest.raises(KdNnpError, match=match):
        check_spec(spec)
    with pytest.raises(KdNnpError):
        make_calculator(spec)


def test_good_specs_pass_the_cheap_check(tmp_path):
    f = tmp_path / "student.pt"
    f.write_bytes(b"")
    for spec in ("chgnet", f"student:{f}", f"student:{f}=mine", "teacher:chgnet",
                 "ase.calculators.emt:EMT", "teacher:ase.calculators.emt:EMT"):  # fmt: skip
        check_spec(spec)
    assert make_calculator("ase.calculators.emt:EMT").name == "emt"
    assert make_calculator("teacher:ase.calculators.emt:EMT").name == "emt"


def test_teacher_mixture_is_the_normalised_weighted_mean():
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.lj import LennardJones

    from kd_nnp.teachers.calculators import parse_teacher_mixture

    emt, lj = "ase.calculators.emt:EMT", "ase.calculators.lj:LennardJones"
    spec = f"teachers:{emt}=1,{lj}=3,so3lr=0"
    assert parse_teacher_mixture(spec.partition(":")[2]) == {emt: 0.25, lj: 0.75}
    check_spec(spec)  # the weight-0 so3lr is not built
    assert method_label(spec) == f"teachers({emt}=1,{lj}=3,so3lr=0)"
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.set_cell(atoms.cell * 1.01, scale_atoms=True)

    def efs(calc):
        a = atoms.copy()
        a.calc = calc
        return a.get_potential_energy(), a.get_forces(), a.get_stress()

    mix, one, two = efs(make_calculator(spec)), efs(EMT()), efs(LennardJones())
    for m, x, y in zip(mix, one, two):
        assert np.allclose(m, 0.25 * np.asarray(x) + 0.75 * np.asarray(y), rtol=1e-10, atol=1e-12)
    assert not np.allclose(mix[1], one[1])  # the forces differ: the test can fail
    assert make_calculator(f"teachers:{emt}=2").name == "emt"  # one teacher: itself


def test_unreadable_student_file_is_a_user_error(tmp_path):
    f = tmp_path / "student.pt"
    f.write_text("not a torch file")
    with pytest.raises(KdNnpError, match="not a readable CHGNet model file"):
        load_chgnet(path=f)
    with pytest.raises(KdNnpError, match="not a readable CHGNet model file"):
        make_calculator(f"student:{f}=x")


def test_teacher_modules_import_without_a_cycle():
    """check and registry share kd_nnp.teachers.base; importing check first works."""
    code = "import kd_nnp.teachers.check, kd_nnp.teachers.registry, kd_nnp.teachers.calculators"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    src = (Path(REPO_ROOT) / "kd_nnp/teachers/check.py").read_text()
    assert "teachers.registry" not in src

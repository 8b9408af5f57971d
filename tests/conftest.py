"""Shared fixtures (small real organic crystals, a labelled store, the shared data folder) and
the one way tests skip on missing optional things:

- ``@requires_shared_data`` (= ``@pytest.mark.shared_data``): skipped when ``../shared/data``
  (or ``$KD_NNP_SHARED_DATA``) is absent; the ``shared_data`` fixture gives its path.
- ``@requires_teacher("so3lr", ...)`` (= ``@pytest.mark.teacher("so3lr", ...)``): skipped when a
  teacher's optional package (``pip install -e .[teachers]``) is not importable;
  :func:`skip_without_teacher` does the same inside a fixture.

So ``pip install -e .[dev]`` without ``[teachers]`` and without the shared data skips those
tests instead of erroring.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

#: teacher (or package) name -> the importable modules it needs (the ``[teachers]`` extra)
TEACHER_MODULES = {
    "so3lr": ("so3krates_torch",),
    "gfn2": ("tblite",),
    "chgnet_d3": ("dftd3",),
    "chgnet": (),  # a core dependency
    "dftd3": ("dftd3",),
    "tblite": ("tblite",),
    "sevenn": ("sevenn",),
    "sevennet_d3": ("sevenn", "dftd3"),
}


def missing_teacher_modules(*names: str) -> list[str]:
    """The modules of ``names`` (keys of TEACHER_MODULES) that cannot be imported."""
    unknown = [n for n in names if n not in TEACHER_MODULES]
    if unknown:
        raise ValueError(f"unknown teacher {unknown}: add it to TEACHER_MODULES in conftest.py")
    mods = dict.fromkeys(m for n in names for m in TEACHER_MODULES[n])
    return [m for m in mods if importlib.util.find_spec(m) is None]


def skip_without_teacher(*names: str) -> None:
    """pytest.skip (also from a fixture) when a teacher's optional package is missing."""
    missing = missing_teacher_modules(*names)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e .[teachers]) for {names}")


def requires_teacher(*names: str) -> pytest.MarkDecorator:
    """Mark a test that needs these teachers; skipped when their packages are missing."""
    if not names:
        raise ValueError("requires_teacher() needs at least one teacher name")
    missing_teacher_modules(*names)  # an unknown name fails at collection
    return pytest.mark.teacher(*names)


requires_shared_data = pytest.mark.shared_data


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("shared_data") is not None:
        from kd_nnp.utils.paths import shared_data_dir

        if shared_data_dir() is None:
            pytest.skip("shared data not available (set KD_NNP_SHARED_DATA)")
    for mark in item.iter_markers("teacher"):
        skip_without_teacher(*mark.args)


SMALL_CODES = ("OXALAC11", "UREAXX02", "FORMAM", "OXALAC02")
# fake per-element zero of the soft labels (eV/atom), like a teacher with another reference
SOFT_ZERO = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    from kd_nnp.utils.threads import set_threads

    set_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["KD_NNP_CACHE"] = str(tmp_path_factory.mktemp("kd_cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    from kd_nnp.utils.paths import shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data not available (set KD_NNP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def small_crystals() -> dict:
    """code -> ase.Atoms of the smallest experimental crystals of pyxtal's test.db."""
    from ase.db import connect

    from kd_nnp.utils.paths import pyxtal_db

    db = connect(pyxtal_db("test"))
    out = {}
    for code in SMALL_CODES:
        row = next(db.select(csd_code=code))
        out[code] = row.toatoms()
    return out


def run_kd_nnp(
    args: list[str], cwd: Path, *, timeout: int = 900, full_error: bool = False
) -> subprocess.CompletedProcess:
    """``python -m kd_nnp.cli ARGS`` in ``cwd`` (one thread, wandb offline); Hydra's full
    traceback on with ``full_error``, off otherwise (the one-line user errors are tested)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "kd_nnp.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def urea_perturbations_store(tmp_path: Path):
    """12 unlabelled frames of urea (UREAXX02: 7 strained + 4 rattled copies and the parent)."""
    from kd_nnp.data.sources.perturb import make_perturbations
    from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
    from kd_nnp.data.store import FrameStore

    fs = FrameStore(tmp_path / "st", create=True)
    fs.add_frames(
        make_perturbations(
            pyxtal_frames("test", codes=["UREAXX02"]), n_strain=7, n_rattle=4, seed=1
        )
    )
    assert len(fs) == 12
    return fs


@pytest.fixture(scope="session")
def chgnet_model():
    from kd_nnp.teachers.calculators import load_chgnet

    return load_chgnet("0.3.0").eval()


def _soft_calculator(chgnet_model):
    """CHGNet + D3(BJ): a cheap teacher that differs from the hard labels."""
    skip_without_teacher("chgnet_d3")  # skips the fixtures (and tests) built on it
    from ase.calculators.mixing import SumCalculator
    from chgnet.model.dynamics import CHGNetCalculator
    from dftd3.ase import DFTD3

    return SumCalculator(
        [
            CHGNetCalculator(model=chgnet_model, use_device="cpu"),
            DFTD3(method="PBE", damping="d3bj"),
        ]
    )


@pytest.fixture(scope="session")
def labelled_store(tmp_path_factory, small_crystals, chgnet_model):
    """A store of 20 frames (4 crystals x 5 perturbations) with hard and soft labels.

    hard = pretrained CHGNet; soft ('toy_teacher') = CHGNet + D3(BJ) with a per-element energy
    zero shift (so alignment matters); frames of OXALAC02 have no hard labels (teacher-only).
    """
    from chgnet.model.dynamics import CHGNetCalculator

    from kd_nnp.data.store import Frame, FrameStore, Labels

    root = tmp_path_factory.mktemp("store")
    store = FrameStore(root, create=True)
    rng = np.random.default_rng(0)
    hard_calc = CHGNetCalculator(model=chgnet_model, use_device="cpu")
    soft_calc = _soft_calculator(chgnet_model)
    frames, soft = [], []
    for code, atoms in small_crystals.items():
        for k, (strain, rattle) in enumerate(
            [(0, 0), (-0.03, 0), (0.05, 0), (0, 0.03), (0.02, 0.05)]
        ):
            a = atoms.copy()
            a.set_cell(a.cell * (1 + strain), scale_atoms=True)
            a.positions += rng.normal(0, rattle, a.positions.shape) if rattle else 0

            def calc(c, a=a):
                b = a.copy()
                b.calc = c
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return Labels(b.get_potential_energy(), b.get_forces(), b.get_stress())

            hard = None if code == "OXALAC02" else calc(hard_calc)
            fr = Frame(f"{code}/p{k}", a, code, "test", hard, {"strain": strain, "rattle": rattle})
            s = calc(soft_calc)
            s.energy += sum(SOFT_ZERO[z] for z in a.numbers)
            frames.append(fr)
            soft.append((fr, s, None, 0.0))
    store.add_frames(frames)
    store.labels("toy_teacher", create=True).write(soft)
    return root


@pytest.fixture(scope="session")
def urea_store(tmp_path_factory, small_crystals, chgnet_model):
    """11 strained/rattled frames of urea (16 atoms each), hard = pretrained CHGNet, soft
    ('toy') = hard energies x 1.01 and forces x 1.1 (no teacher package needed). Equal atom
    counts: a data-parallel step then averages exactly what one process would (tests/test_ddp.py).
    The 2nd validation frame of ``data.n_val=3 data.grouped=false seed=0`` has no hard
    labels, so of two data-parallel ranks one validates no hard label.
    """
    from chgnet.model.dynamics import CHGNetCalculator

    from kd_nnp.data.store import Frame, FrameStore, Labels
    from kd_nnp.training.split import split_frames

    root = tmp_path_factory.mktemp("urea_store")
    ids = [f"UREA/p{k}" for k in range(11)]
    _, val = split_frames(ids, ids, n_val=3, seed=0, grouped=False)
    calc = CHGNetCalculator(model=chgnet_model, use_device="cpu")
    rng = np.random.default_rng(1)
    frames, soft = [], []
    for k, fid in enumerate(ids):
        a = small_crystals["UREAXX02"].copy()
        a.set_cell(a.cell * (1 + 0.01 * (k - 4)), scale_atoms=True)
        a.positions += rng.normal(0, 0.03, a.positions.shape)
        a.calc = calc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lab = Labels(a.get_potential_energy(), a.get_forces(), a.get_stress())
        fr = Frame(fid, a.copy(), fid, "test", None if fid == val[1] else lab, {})
        frames.append(fr)
        soft.append((fr, Labels(lab.energy * 1.01, lab.forces * 1.1, lab.stress), None, 0.0))
    store = FrameStore(root, create=True)
    store.add_frames(frames)
    store.labels("toy", create=True).write(soft)
    return root


# ------------------------------------------------------------------ Markdown tables (D11)


def unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def assert_md_tables_well_formed(text: str) -> int:
    """Every row of every table has as many unescaped pipes as its header; returns #tables."""
    n_tables = 0
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if (
            lines[i].startswith("|")
            and i + 1 < len(lines)
            and re.match(r"^\|[-:| ]+\|$", lines[i + 1])
        ):
            n_tables += 1
            width = unescaped_pipes(lines[i])
            while i < len(lines) and lines[i].startswith("|"):
                assert unescaped_pipes(lines[i]) == width, f"row {i + 1}: {lines[i]!r}"
                i += 1
        else:
            i += 1
    return n_tables

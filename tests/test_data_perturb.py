"""`kd-nnp data perturb`: one recipe per store, a calculator given (not a teacher looked up),
progress per parent."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from ase.calculators.emt import EMT

from kd_nnp.cli import main as kd_main
from kd_nnp.data.sources.perturb import PerturbSettings, build_perturb_store
from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
from kd_nnp.data.store import FrameStore
from kd_nnp.errors import KdNnpError
from kd_nnp.utils.paths import REPO_ROOT


@pytest.fixture
def parents(tmp_path: Path) -> Path:
    fs = FrameStore(tmp_path / "parents", create=True)
    fs.add_frames(pyxtal_frames("test", codes=["UREAXX02", "FORMAM"]))
    assert len(fs) == 2
    return fs.root


def _args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "perturb", "--from", str(src), "--out", str(out), "--n-rattle", "1", *extra]


def test_perturb_rerun_with_other_settings_is_refused(parents: Path, tmp_path: Path, capsys):
    out = tmp_path / "pert"
    assert kd_main(_args(parents, out, "--n-strain", "2")) == 0
    n = len(FrameStore(out))
    assert n == 2 * 4
    capsys.readouterr()
    # other settings: refused, nothing appended
    assert kd_main(_args(parents, out, "--n-strain", "3", "--volume-range=-0.05,0.1")) == 1
    err = capsys.readouterr().err
    assert "another perturb recipe" in err and "n_strain: 2 -> 3" in err
    assert "volume_range" in err and len(FrameStore(out)) == n
    # the same settings resume (nothing to do)
    assert kd_main(_args(parents, out, "--n-strain", "2")) == 0
    assert "0 parents processed" in capsys.readouterr().out
    # frames not written by perturb: refused too
    with pytest.raises(KdNnpError, match="did not write with a recorded recipe"):
        build_perturb_store(str(parents), str(parents), PerturbSettings(n_strain=1))


def test_perturb_gets_a_calculator_and_logs_progress(parents: Path, tmp_path: Path, caplog):
    built = []

    def make() -> EMT:
        built.append(1)
        return EMT()

    s = PerturbSettings(n_strain=1, n_rattle=0, prerelax_steps=3)
    with caplog.at_level(logging.INFO, logger="kd_nnp.data.sources.perturb"):
        n_par, n_fr = build_perturb_store(
            str(parents), str(tmp_path / "p"), s, calculator=make, calculator_name="emt"
        )
    assert (n_par, n_fr) == (2, 4) and built == [1]  # built once, lazily
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("perturb 1/2 pyxtal-test:") and "elapsed" in m for m in msgs), msgs
    assert any(m.startswith("perturb 2/2") and "pre-relaxed in" in m for m in msgs), msgs
    frames = list(FrameStore(tmp_path / "p").iter_frames())
    assert all(f.info["prerelax_steps"] <= 3 for f in frames)
    # a rerun with everything done never builds the calculator
    assert build_perturb_store(
        str(parents), str(tmp_path / "p"), s, calculator=make, calculator_name="emt"
    ) == (0, 0)
    assert built == [1]
    # data/ does not reach into teachers/ (the CLI verb composes name -> calculator)
    src = (REPO_ROOT / "kd_nnp/data/sources/perturb.py").read_text()
    assert "kd_nnp.teachers" not in src

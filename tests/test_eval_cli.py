"""`kd-nnp evaluate relax` end to end: calculator specs checked before any relaxation, labels
unique, unreadable CIFs skipped and listed, Markdown tables GitHub can render, workers that
die with the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import assert_md_tables_well_formed

from kd_nnp.cli import main
from kd_nnp.evaluation.structures import load_dataset

TESTS = Path(__file__).resolve().parent
SCALED = "test_eval_cli:scaled_calc"  # its own spec: calculators are cached per spec


def scaled_calc():
    from test_eval_relax import ScaledCrystalCalc

    return ScaledCrystalCalc()


def _relax(out: Path, *calcs: str, dataset: str = "pyxtal:test", extra: tuple = ()) -> int:
    argv = ["evaluate", "relax", "--dataset", dataset, "--limit", "1", "--max-atoms", "30"]
    argv += ["--workers", "1", "--fmax", "0.01", "--out", str(out), "--quiet", *extra]
    for c in calcs:
        argv += ["--calc", c]
    return main(argv)


def _pkg(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / "calcs.py").write_text("from test_eval_cli import scaled_calc  # noqa\n")


def test_two_specs_with_one_label_are_an_error(tmp_path, monkeypatch, capsys):
    """D1: two runs' students (same file name) got one label: one was dropped silently."""
    _pkg(tmp_path / "src", "run_a")
    _pkg(tmp_path / "src", "run_b")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    out = tmp_path / "out"
    rc = _relax(out, "run_a.calcs:scaled_calc", "run_b.calcs:scaled_calc")
    err = capsys.readouterr().err
    assert rc == 1
    assert "run_a.calcs:scaled_calc" in err and "run_b.calcs:scaled_calc" in err
    assert not (out / "relax.jsonl").exists() or not (out / "relax.jsonl").read_text()


@pytest.mark.parametrize("spec", ["chgnett", "student:/nonexistent/student.pt"])
def test_calculator_that_cannot_be_built_fails_before_relaxing(tmp_path, capsys, spec):
    """D6: a misspelt calculator or a missing student file exited 0 with error records."""
    out = tmp_path / "out"
    rc = _relax(out, SCALED, spec)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and spec in err[0]
    assert not (out / "relax.jsonl").exists() or not (out / "relax.jsonl").read_text()


def test_unreadable_cif_is_skipped_and_listed(tmp_path, capsys, caplog):
    """D8: one unreadable CIF aborted the benchmark with an empty reason (StopIteration:)."""
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms.write(cifs / "formam.cif")
    (cifs / "broken.cif").write_text("data_broken\n_cell_length_a 5.0\n")
    out = tmp_path / "out"
    rc = _relax(out, SCALED, dataset=str(cifs), extra=("--no-references",))
    assert rc == 0
    printed = capsys.readouterr().out
    md = (out / "table.md").read_text()
    for text in (printed, md, caplog.text):
        line = next(ln for ln in text.splitlines() if "broken.cif" in ln)
        reason = line.split("broken.cif", 1)[1].strip(" :|")
        assert len(reason) > len("StopIteration") + 3, line  # a reason, not just a type
    assert "formam" in md


def test_markdown_tables_have_as_many_cells_as_headers(tmp_path):
    """D11: headers such as |sigma| had unescaped pipes: GitHub rendered no table."""
    out = tmp_path / "out"
    assert _relax(out, SCALED) == 0
    assert assert_md_tables_well_formed((out / "table.md").read_text()) >= 2
    assert "max \\|sigma\\| GPa" in (out / "table.md").read_text()


SCRIPT = textwrap.dedent(
    """
    import sys
    from kd_nnp.cli import main
    sys.exit(main(["evaluate", "relax", "--calc", "test_eval_cli:slow_calc", "--limit", "4",
                   "--max-atoms", "40", "--workers", "2", "--no-references", "--no-rmsd",
                   "--quiet", "--out", sys.argv[1]]))
    """
)


def slow_calc():
    from test_eval_relax import ScaledCrystalCalc

    class Slow(ScaledCrystalCalc):
        def calculate(self, *args, **kwargs):
            time.sleep(0.5)
            super().calculate(*args, **kwargs)

    return Slow()


def test_workers_die_with_the_parent(tmp_path):
    """D10: kill -9 of the parent left both relaxation workers running."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            workers = [
                c for c in parent.children(recursive=True) if "spawn" in " ".join(c.cmdline())
            ]
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(workers) >= 2, "the benchmark never started its 2 workers"
        time.sleep(3.0)  # workers past their start-up, relaxing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"workers still running 5 s after the parent was killed: {alive}"
    finally:
        for w in workers:
            if w.is_running():
                w.kill()
        if proc.poll() is None:
            proc.kill()

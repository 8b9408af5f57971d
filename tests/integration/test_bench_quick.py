"""``make bench``'s runner (experiments/bench/run_all.py): the quick training section runs
end to end in subprocesses and reports chgnet's and kd_nnp's step-0 losses as equal.
Slow: ~2 min per test on 2 busy cores; `make test-full` runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_ALL = REPO / "experiments" / "bench" / "run_all.py"

pytestmark = pytest.mark.slow


def _run_quick(tmp_path, section: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``run_all.py --quick --only SECTION`` in a subprocess: its result and bench record,
    asserting it succeeded without a FAILED row."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    r = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--only", section, *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "bench_quick.json").read_text())
    assert [x for x in rec["rows"] if x["value"] == "FAILED"] == [], rec["rows"]
    return r, rec


def test_run_all_quick_training_reports_equal_step0_loss(tmp_path):
    r, rec = _run_quick(tmp_path, "training", "--train-codes", "OXALAC11", "--epochs", "1")
    rows = rec["rows"]
    step0 = [x for x in rows if x["what"].startswith("step-0 loss")]
    assert len(step0) == 2 and all(x["ok"] is True for x in step0), step0
    check = rec["sections"]["training"]["result"]["check"]
    assert check["loss_rel_diff_cached"] <= 1e-5
    assert check["grad_max_abs_diff_cached"] <= 1e-4 * check["grad_max_abs"]
    res = rec["sections"]["training"]["result"]
    assert res["trainer"]["epoch_s"] and res["cached"]["epoch_s"] and res["full"]["epoch_s"]
    # one table, printed and written
    assert "step-0 loss, chgnet vs kd_nnp cached" in r.stdout
    assert (tmp_path / "bench_quick.md").read_text().count("| training | step-0 loss") == 2


def test_run_all_quick_cache_section(tmp_path):
    """The derivative-cache rows (issue 16): every scheme built and sized, and the E+F+S
    epoch of chgnet's Trainer against the cached subsampled path, without a failure."""
    _, rec = _run_quick(tmp_path, "cache")
    rows = rec["rows"]
    builds = [x["what"] for x in rows if x["what"].startswith("build ")]
    assert [b.split(",")[0] for b in builds] == [
        "build full", "build M=2", "build M=4", "build M=8", "build strain", "build M=4+strain"
    ]  # fmt: skip
    (size,) = rec["sections"]["cache"]["result"]["sizes"]
    sch = size["schemes"]
    assert sch["M=2"]["directions"] == 6 and sch["strain"]["directions"] == 6
    assert sch["full"]["directions"] == 3 * size["n_atoms"]
    assert sch["M=4"]["nbytes"] < sch["full"]["nbytes"]
    assert any(x["what"].startswith("epoch E+F+S") for x in rows)

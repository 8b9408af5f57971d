"""The main job's smoke variant: `kd-nnp demo demo=quick` end to end, offline, twice
(the rerun reuses every cache). Slow: ~3 min on 2 busy cores; `make test-full` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.teacher("so3lr")  # the demo's default teacher
def test_quick_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "kd_nnp.cli", "demo", "demo=quick",
           f"paths.output_dir={tmp_path}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "demo-quick"  # conf/demo/quick.yaml
    result = json.loads((out / "demo_result.json").read_text())
    methods = {row["method"] for row in result["summary"]}
    assert {"CHGNet (pretrained)", "teacher (so3lr)", "student (distilled)"} <= methods
    for key in ("table", "loss_curves", "student"):
        assert os.path.exists(result["paths"][key]), key
    assert (out / "relax" / "parity_volume.png").exists()
    crystals = json.loads((out / "crystals.json").read_text())
    assert not set(crystals["eval"]) & set(crystals["train"])
    assert "results" in r.stdout and "outputs:" in r.stdout
    assert "volume distance to the teacher" in r.stdout
    assert result["to_teacher"]["student (distilled)"]["reference"] == "teacher (so3lr)"
    # rerun: every stage reuses its cache (no relabelling, no retraining, no re-relaxing)
    r2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-4000:]
    again = json.loads((out / "demo_result.json").read_text())
    assert again["times_s"]["train"] < 0.5 * result["times_s"]["train"] + 5

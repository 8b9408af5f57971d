"""The prepared GPU scripts (experiments/gpu/*.sh) cannot be run here (no CUDA), so what can
be checked without a GPU is checked: shell syntax, every ``--option`` they pass to a Python
script exists in that script's argparse, and the scale check's summary formats its parts and
names the missing ones."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "experiments" / "gpu").glob("*.sh"))


def _options(py: Path) -> set[str]:
    """The ``--options`` a script's argparse declares (read from its source, no import)."""
    found = set()
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant)
                      and str(a.value).startswith("--")}  # fmt: skip
    return found


def _python_calls(sh: Path) -> list[tuple[Path, list[str]]]:
    text = sh.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"\$PY (experiments/\S+\.py)([^|>]*)", line):
            calls.append((ROOT / m.group(1), re.findall(r"(--[a-z][a-z0-9-]*)", m.group(2))))
    return calls


def test_there_are_gpu_scripts() -> None:
    names = {s.name for s in SCRIPTS}
    assert {"scale_check.sh", "batched_relax_check.sh", "feature_build_check.sh"} <= names


@pytest.mark.parametrize("sh", SCRIPTS, ids=lambda p: p.name)
def test_gpu_script_syntax_and_options(sh: Path) -> None:
    subprocess.run(["bash", "-n", str(sh)], check=True)
    for py, opts in _python_calls(sh):
        assert py.is_file(), f"{sh.name} runs {py}, which does not exist"
        unknown = set(opts) - _options(py)
        assert not unknown, (
            f"{sh.name} passes {sorted(unknown)} to {py.name}, which has no such option"
        )


def test_scale_check_runs_all_three_parts() -> None:
    called = {py.name for py, _ in _python_calls(ROOT / "experiments/gpu/scale_check.sh")}
    assert {"bench_lean.py", "run_all.py", "bench_batched_relax.py", "scale_summary.py"} <= called


def test_scale_summary_formats_parts_and_names_missing(tmp_path: Path) -> None:
    case = {"n_atoms": 608, "step_s": [2.0, 1.0, 1.0], "median_s": 1.0, "base_mb": 500.0,
            "device": "cuda"}  # fmt: skip
    lean = {"config": {"batch_sizes": [8]}, "skipped": {}, "errors": {},
            "cases": [{**case, "backend": "full", "batch_size": 8, "step_peak_mb": 1000.0},
                      {**case, "backend": "lean", "batch_size": 8, "step_peak_mb": 40.0,
                       "median_s": 0.5}],
            "grad_diff": {"8": {"grad_max_abs_diff": 1e-8, "grad_max_abs": 1.0,
                                "loss_full": 2.0, "loss_lean": 2.0}}}  # fmt: skip
    (tmp_path / "lean.json").write_text(json.dumps(lean))
    relax = {"batched": {"A": {}, "B": {}}, "device": "cuda", "sequential_s": 30.0,
             "batched_s": 10.0, "batch_size": 8, "ratio": 3.0, "max_rel_volume_diff": 2e-6}  # fmt: skip
    (tmp_path / "relax.json").write_text(json.dumps(relax))
    (tmp_path / "device.txt").write_text("NVIDIA H100\n")
    (tmp_path / "failed.txt").write_text("cache build: failed or timed out\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments/gpu/scale_summary.py"), str(tmp_path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "device: NVIDIA H100" in out
    assert "failed parts: cache build: failed or timed out" in out
    assert "| batch 8: full/lean peak memory | 25.0x |" in out
    assert "| batch 8: lean/full step time | 0.50x |" in out
    assert "| 2 | cuda | 30.0 s | 10.0 s (batch_size 8) | 3.00x | 2.0e-06 |" in out
    assert "missing: " in out and "cache/bench.md" in out

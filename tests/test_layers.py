"""Arrows run one way: data -> teachers -> training -> evaluation -> reports.

Every ``import`` in kd_nnp (module level or inside a function) is read with ``ast``: a stage
package may import its own stage, earlier stages and the foundation (``kd_nnp.errors``,
``kd_nnp.utils``); the foundation imports only itself; the verbs (``kd_nnp.cli``) and the
end-to-end demo (``kd_nnp.demo``) may import everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kd_nnp

PACKAGE = Path(kd_nnp.__file__).parent
STAGES = ["data", "teachers", "training", "evaluation", "reports"]
FOUNDATION = {"errors", "utils", "__init__"}
TOP = {"cli", "demo"}


def _layer(top: str) -> int:
    if top in FOUNDATION:
        return -1
    if top in TOP:
        return len(STAGES)
    return STAGES.index(top)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in out if m == "kd_nnp" or m.startswith("kd_nnp.")]


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    tops -= {"__pycache__", "_conf"}
    unknown = sorted(t for t in tops if t not in FOUNDATION | TOP | set(STAGES))
    assert not unknown, f"modules outside the layer map of this test: {unknown}"


def test_no_package_imports_a_later_stage():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, module in _imports(path):
            there = _top(module)
            if _layer(there) > _layer(here):
                bad.append(f"kd_nnp/{rel}:{line} imports {module}")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    """The scan would catch a later-stage import (so the test above can fail)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from kd_nnp.evaluation.job import evaluate_student\n")
    assert _imports(f) == [(2, "kd_nnp.evaluation.job")]
    assert _layer(_top("kd_nnp.evaluation.job")) > _layer("training")

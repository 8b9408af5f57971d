"""Export a trained student as a plain CHGNet model file.

The exported file is what ``chgnet.model.CHGNet.from_file`` reads
(``torch.save({"model": model.as_dict(), ...})``), so ``CHGNetCalculator``,
``StructOptimizer`` and any ASE workflow use it directly; kd_nnp adds a ``kd_nnp`` entry with
provenance (loss ratios, data, commit) that chgnet ignores. Loading it (or a checkpoint)
back: :func:`kd_nnp.teachers.calculators.load_chgnet`, or as an ASE calculator
``make_calculator("student:PATH")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from chgnet.model import CHGNet


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file and a rename: a killed process
    leaves the old file or the new one, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def export_student(model: CHGNet, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (atomically) to ``path`` in chgnet's model-file format."""
    return save_atomic({"model": model.as_dict(), "kd_nnp": metadata or {}}, path)

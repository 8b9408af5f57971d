"""Export a trained student as a plain CHGNet model file, and load it as an ASE calculator.

The exported file is what ``chgnet.model.CHGNet.from_file`` reads
(``torch.save({"model": model.as_dict(), ...})``), so ``CHGNetCalculator``,
``StructOptimizer`` and any ASE workflow use it directly; kd_nnp adds a ``kd_nnp`` entry with
provenance (loss ratios, data, commit) that chgnet ignores.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from chgnet.model import CHGNet


def export_student(model: CHGNet, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (atomically) to ``path`` in chgnet's model-file format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save({"model": model.as_dict(), "kd_nnp": metadata or {}}, tmp)
    os.replace(tmp, path)
    return path


def student_from_checkpoint(ckpt_path: str | Path) -> CHGNet:
    """Rebuild the CHGNet student from a kd_nnp Lightning checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "chgnet_model_args" not in ckpt:
        raise ValueError(f"{ckpt_path}: not a kd_nnp training checkpoint (no chgnet_model_args)")
    state = {
        k[len("student.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet(**ckpt["chgnet_model_args"])
    model.load_state_dict(state)
    return model


def load_model(path: str | Path) -> CHGNet:
    """A CHGNet from an exported model file or a kd_nnp Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file or checkpoint at {path}")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(blob, dict) and "chgnet_model_args" in blob:
        return student_from_checkpoint(path)
    if isinstance(blob, dict) and "model" in blob:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CHGNet.from_dict(blob["model"])
    raise ValueError(f"{path}: neither a CHGNet model file nor a kd_nnp checkpoint")


def load_calculator(path: str | Path, **kwargs: Any) -> Any:
    """An ASE calculator (chgnet's ``CHGNetCalculator``) for a student file or checkpoint."""
    from chgnet.model.dynamics import CHGNetCalculator

    kwargs.setdefault("use_device", "cpu")
    return CHGNetCalculator(model=load_model(path), **kwargs)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kd-nnp export", description=__doc__)
    ap.add_argument("checkpoint", help="kd_nnp Lightning checkpoint (.ckpt)")
    ap.add_argument("out", help="output model file (loadable by CHGNet.from_file)")
    args = ap.parse_args(argv)
    model = student_from_checkpoint(args.checkpoint)
    export_student(model, args.out, {"checkpoint": str(Path(args.checkpoint).resolve())})
    print(f"wrote {args.out}")
    return 0

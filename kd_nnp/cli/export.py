"""``kd-nnp export CKPT OUT``: a training checkpoint as a plain CHGNet model file."""

from __future__ import annotations

import argparse
from pathlib import Path

from kd_nnp.teachers.calculators import student_from_checkpoint
from kd_nnp.training.export import export_student


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kd-nnp export", description=__doc__)
    ap.add_argument("checkpoint", help="kd_nnp Lightning checkpoint (.ckpt)")
    ap.add_argument("out", help="output model file (loadable by CHGNet.from_file)")
    args = ap.parse_args(argv)
    model = student_from_checkpoint(args.checkpoint)
    export_student(model, args.out, {"checkpoint": str(Path(args.checkpoint).resolve())})
    print(f"wrote {args.out}")
    return 0

"""``kd-nnp export CKPT OUT``: a training checkpoint as a plain CHGNet model file;
``kd-nnp export COMMITTEE OUT --head K|mean``: one head (or the exact mean) of a committee
file (a ``committee.size=K`` run's ``student.pt``) as a plain CHGNet model file."""

from __future__ import annotations

import argparse
from pathlib import Path

from kd_nnp.errors import KdNnpError
from kd_nnp.teachers.calculators import read_model_file, student_from_checkpoint
from kd_nnp.teachers.committee import head_model, is_committee_blob
from kd_nnp.training.export import export_student


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kd-nnp export", description=__doc__)
    ap.add_argument("checkpoint", help="kd_nnp Lightning checkpoint (.ckpt) or committee file")
    ap.add_argument("out", help="output model file (loadable by CHGNet.from_file)")
    ap.add_argument("--head", default=None, help="committee file: head index 0..K-1 or 'mean'")
    args = ap.parse_args(argv)
    src = Path(args.checkpoint)
    blob = read_model_file(src)
    meta = {"source": str(src.resolve())}
    if is_committee_blob(blob):
        if args.head is None:
            raise KdNnpError(f"{src} is a committee file: choose --head 0..K-1 or --head mean")
        head = args.head if args.head == "mean" else _head_index(args.head)
        model = head_model(blob, head, str(src))
        meta = {**blob.get("kd_nnp", {}), **meta, "committee_head": head}
    else:
        if args.head is not None:
            raise KdNnpError(f"--head: {src} is not a committee file")
        model = student_from_checkpoint(src)
        meta = {"checkpoint": str(src.resolve())}
    export_student(model, args.out, meta)
    print(f"wrote {args.out}")
    return 0


def _head_index(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise KdNnpError(f"--head must be an integer or 'mean', got {text!r}") from None

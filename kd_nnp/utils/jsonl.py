"""JSON-lines result and log files that survive ``kill -9``, and JSON-safe numbers.

Every long job streams one JSON object per line (relaxation records, generation and molecule
logs) so that a killed run loses at most the line being written: :func:`read_jsonl` skips a
line cut short by a kill, :func:`open_append` / :func:`append_jsonl` first end such a line so
the next record starts on a line of its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file ([] if absent); an unreadable line (a write cut by a kill)
    is skipped with a warning naming the file and line."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: unreadable line skipped (interrupted write?)", path, lineno)
    return records


def open_append(path: str | Path) -> TextIO:
    """Open a JSON-lines file for appending, first ending a line cut short by a kill."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                with path.open("a") as fa:
                    fa.write("\n")
    return path.open("a")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a line and fsync it (a kill after this returns loses nothing)."""
    with open_append(path) as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def nan_to_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, in nested dicts and
    lists: what strict JSON readers accept."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj

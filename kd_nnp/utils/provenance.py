"""Provenance of a run or a label set: package versions, git commit, host, hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kd_nnp.utils.paths import REPO_ROOT

TRACKED_PACKAGES = (
    "kd_nnp",
    "torch",
    "chgnet",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "pymatgen",
    "ase",
    "numpy",
    "pyxtal",
    "so3krates-torch",
    "tblite",
    "dftd3",
)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(
    path: Path = REPO_ROOT, *, pathspec: str | None = None, untracked: bool = False
) -> tuple[str, list[str]] | None:
    """``(HEAD commit, files with local changes)`` of a checkout (limited to ``pathspec``;
    untracked files listed only with ``untracked``), or None outside git."""
    status = ["git", "-C", str(path), "status", "--porcelain"]
    status += [] if untracked else ["--untracked-files=no"]
    status += [pathspec] if pathspec else []
    try:
        sha = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        lines = subprocess.run(
            status, capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha, [line[3:] for line in lines if line.strip()]


def git_commit(path: Path = REPO_ROOT) -> str | None:
    """Commit of the kd_nnp checkout (with ``-dirty`` when there are local changes)."""
    state = git_state(path)
    if state is None:
        return None
    sha, changed = state
    return sha + ("-dirty" if changed else "")


def environment_record() -> dict[str, Any]:
    return {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git_commit": git_commit(),
    }


def stable_hash(obj: Any, length: int = 16) -> str:
    """Deterministic short hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]

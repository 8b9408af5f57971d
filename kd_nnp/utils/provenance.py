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


def git_commit(path: Path = REPO_ROOT) -> str | None:
    """Commit of the kd_nnp checkout (with ``-dirty`` when there are local changes)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


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

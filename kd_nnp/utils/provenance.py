"""Provenance of a run or a label set: package versions, git commit, host, hashes; the
record of a job folder's first configuration, checked when the job is launched again."""

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

from kd_nnp.errors import KdNnpError
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


# ---------------------------------------------------------------- job records (relaunches)
JOB_CONFIG = "config.yaml"  # the resolved config of the job's first run, never rewritten
JOB_RECORD = "job.json"  # its stable hash, the command-line overrides, the first-run time
# settings that change how a job runs, never what it computes: a relaunch may change them
RUNTIME_KEYS = ("paths", "threads", "feature_workers", "feature_device", "skip_if_done")


class JobConfigMismatch(KdNnpError):
    """A job folder already holds a job with another configuration."""


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}`` (lists and scalars are leaves; ``{}`` is a leaf)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _override_keys(overrides: list[str]) -> list[str]:
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.append(key.split("@", 1)[0])
    return keys


def config_differences(
    old: dict[str, Any],
    new: dict[str, Any],
    overrides: list[str] | None = None,
    ignore: tuple[str, ...] = RUNTIME_KEYS,
) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of the resolved configs that make two launches different jobs.

    Keys under ``ignore`` never count. A key present in both must be equal. A key only in the
    new config (one the code gained since the first run) counts only when a command-line
    override sets it (or its group): otherwise it holds the config files' default, which the
    first run's code implied. A key only in the old config (one the code dropped) does not count.
    """

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    a = {k: v for k, v in flatten(old).items() if not ignored(k)}
    b = {k: v for k, v in flatten(new).items() if not ignored(k)}
    norm = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    diff = {k: (a[k], b[k]) for k in a.keys() & b.keys() if norm(a[k]) != norm(b[k])}
    set_keys = _override_keys(overrides or [])
    for k in b.keys() - a.keys():
        if any(k == s or k.startswith(s + ".") for s in set_keys):
            diff[k] = ("<absent>", b[k])
    return dict(sorted(diff.items()))


def check_job_config(
    run_dir: Path, config: dict[str, Any], overrides: list[str] | None = None
) -> str:
    """Record the resolved ``config`` of a job folder at its first launch; at a later launch
    (resume of a killed job, relaunch of a finished sweep) check it is the same job.

    Returns ``"new"`` (recorded now) or ``"same"``; raises :class:`JobConfigMismatch` naming
    the keys that differ otherwise (the recorded files are left as they are).
    """
    import yaml

    cfg_path, rec_path = run_dir / JOB_CONFIG, run_dir / JOB_RECORD
    if not cfg_path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(cfg_path)
        record = {
            "config_hash": stable_hash(config),
            "overrides": list(overrides or []),
            "first_run_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        rec_path.write_text(json.dumps(record, indent=2))
        return "new"
    if rec_path.exists():
        if json.loads(rec_path.read_text()).get("config_hash") == stable_hash(config):
            return "same"
    old = yaml.safe_load(cfg_path.read_text()) or {}
    diff = config_differences(old, config, overrides)
    if not diff:
        return "same"
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:8])
    more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
    raise JobConfigMismatch(
        f"{run_dir} holds a job with another configuration ({cfg_path.name}): {shown}{more}; "
        "use a new hydra.run.dir / hydra.sweep.dir, or delete that folder to redo the job"
    )

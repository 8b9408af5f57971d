"""Where things live: the repo, its Hydra configs, pyxtal's embedded databases, shared data."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parent
SHARED_DATA_ENV = "KD_NNP_SHARED_DATA"
CACHE_ENV = "KD_NNP_CACHE"


def conf_dir() -> Path:
    """Directory of the Hydra configs: ``conf/`` in a checkout, ``kd_nnp/_conf`` in a wheel."""
    for cand in (REPO_ROOT / "conf", PACKAGE_DIR / "_conf"):
        if (cand / "train.yaml").is_file():
            return cand
    raise FileNotFoundError(
        f"kd_nnp Hydra configs not found in {REPO_ROOT / 'conf'} or {PACKAGE_DIR / '_conf'}"
    )


def pyxtal_db(name: str = "test") -> Path:
    """Path of a database shipped in the pyxtal wheel: ``test`` (100 CSD organic crystals)
    or ``mech`` (50 crystals with mechanical data)."""
    import pyxtal

    path = Path(pyxtal.__file__).parent / "database" / f"{name}.db"
    if not path.is_file():
        raise FileNotFoundError(f"pyxtal does not ship {path.name} (looked in {path.parent})")
    return path


def shared_data_dir(required: bool = False) -> Path | None:
    """The read-only reference data beside the repo.

    Taken from ``$KD_NNP_SHARED_DATA``; otherwise ``<repo>/../shared/data`` when it exists.
    Returns None when absent (a user's fresh machine), or raises if ``required``.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${SHARED_DATA_ENV}={env} is not a directory")
        return path
    default = REPO_ROOT.parent / "shared" / "data"
    if default.is_dir():
        return default
    if required:
        raise FileNotFoundError(
            f"shared reference data not found: set ${SHARED_DATA_ENV} (looked in {default})"
        )
    return None


def cache_dir() -> Path:
    """Root of kd_nnp's content-addressed caches (graphs, features, labels of the demo).

    ``$KD_NNP_CACHE`` or ``<repo>/.cache/kd_nnp`` (``~/.cache/kd_nnp`` for a wheel install)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    elif (REPO_ROOT / "pyproject.toml").is_file():
        path = REPO_ROOT / ".cache" / "kd_nnp"
    else:
        path = Path.home() / ".cache" / "kd_nnp"
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Run a Hydra task from a CLI verb with the repo's ``conf/`` directory.

``kd-nnp train experiment=x loss.r_he=0.1 -m`` becomes a normal ``@hydra.main`` run:
overrides, ``-m/--multirun``, ``--cfg job``, ``hydra/launcher=submitit_slurm`` all work.

A user error (:class:`kd_nnp.errors.KdNnpError`) of a single run reaches the ``kd-nnp``
dispatcher (one line, exit 1) instead of Hydra's error report; in a multirun the launcher
handles the failed job like any other (the other jobs run, the exit status is non-zero).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from kd_nnp.utils.paths import conf_dir


def run_hydra(config_name: str, task: Callable[[DictConfig], Any], argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from kd_nnp.errors import KdNnpError

    holder: dict[str, Any] = {}

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _entry(cfg: DictConfig) -> Any:
        try:
            out = task(cfg)
        except KdNnpError as err:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            holder["error"] = err
            return None
        holder["out"] = out
        return out

    old = sys.argv
    sys.argv = [f"kd-nnp {config_name}", *argv]
    try:
        _entry()
    finally:
        sys.argv = old
    if "error" in holder:
        raise holder["error"]
    return 0

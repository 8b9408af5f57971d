"""Run a Hydra task from a CLI verb with the repo's ``conf/`` directory.

``kd-nnp train experiment=x loss.r_he=0.1 -m`` becomes a normal ``@hydra.main`` run:
overrides, ``-m/--multirun``, ``--cfg job``, ``hydra/launcher=submitit_slurm`` all work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from kd_nnp.utils.paths import conf_dir


def run_hydra(config_name: str, task: Callable[[DictConfig], Any], argv: list[str]) -> int:
    import hydra

    holder: dict[str, Any] = {}

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _entry(cfg: DictConfig) -> Any:
        out = task(cfg)
        holder["out"] = out
        return out

    old = sys.argv
    sys.argv = [f"kd-nnp {config_name}", *argv]
    try:
        _entry()
    finally:
        sys.argv = old
    return 0

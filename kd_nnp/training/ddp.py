"""Data-parallel training (``trainer=ddp`` / ``trainer=ddp_cpu``) through the ``kd-nnp`` CLI.

Lightning's DDP on one node starts the extra ranks by running the script again
(``_SubprocessScriptLauncher``); with Hydra it re-runs ``sys.argv``, which under
``kd-nnp train`` lacks the verb (and under ``-m`` would start a whole sweep again per rank).
:class:`DDPStrategy` starts each extra rank as ``python -m kd_nnp.cli <verb>`` with the
*job's* overrides into the same run folder (``hydra.output_subdir=null``; its log goes to
``train.rank<k>.log``), so single runs and every job of a sweep train data-parallel.

What each rank does (:func:`kd_nnp.training.train.run_training`): every rank reads the data
and attaches the caches (entries are written atomically, content-addressed: ranks that build
the same entry at once write identical files); only rank 0 writes the run folder
(``config.yaml``, ``provenance.json``, ``data_summary.json``, curves, ``student.pt``,
``metrics.json``; Lightning writes logs and checkpoints on rank 0 only). Training batches come
from Lightning's ``DistributedSampler`` (``data.batch_size`` frames per rank; it pads the
training set to a multiple of the world size by repeating frames); validation and test
batches from :class:`UnpaddedSampler`, so every validation frame counts exactly once and the
epoch MAEs (reduced over ranks by torchmetrics) equal the single-process ones.

Processes started externally (``srun`` with one task per GPU, ``torchrun``) are used as
Lightning finds them; this strategy only changes how it starts ranks itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sized
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as _LightningDDP
from lightning.pytorch.strategies.launchers.subprocess_script import (
    _SubprocessScriptLauncher,
)
from torch.utils.data import DistributedSampler

#: environment variables Lightning's launcher sets in the launching process
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def env_rank() -> int:
    """This process's rank before a Trainer exists, as Lightning reads it (``RANK``,
    ``LOCAL_RANK``, ``SLURM_PROCID``; 0 when none is set)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def _hydra_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_command(local_rank: int) -> tuple[list[str], str]:
    """``(argv, cwd)`` of rank ``local_rank`` of the current Hydra job: the same verb and the
    job's own overrides, single-run mode, into the job's output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    if hc.job.config_name != "train":
        from kd_nnp.errors import KdNnpError

        raise KdNnpError(
            f"data-parallel training starts its ranks through `kd-nnp train`; `kd-nnp "
            f"{hc.job.config_name}` cannot (use trainer=cpu or trainer=gpu there)"
        )
    out = hc.runtime.output_dir
    argv = [sys.executable, "-m", "kd_nnp.cli", str(hc.job.config_name), *hc.overrides.task]
    argv += [
        f"hydra.run.dir={_hydra_quote(out)}",
        "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_rank{local_rank}",
    ]
    handlers = (hc.job_logging or {}).get("handlers") or {}
    if "file" in handlers and "filename" in handlers["file"]:
        path = os.path.join(out, f"train.rank{local_rank}.log")
        argv.append(f"hydra.job_logging.handlers.file.filename={_hydra_quote(path)}")
    return argv, get_original_cwd()


class _Launcher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with :func:`child_command` for Hydra runs."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # a plain script: Lightning's own command
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        self.procs = []
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            argv, cwd = child_command(local_rank)
            self.procs.append(subprocess.Popen(argv, env=env, cwd=cwd))
        return None


class DDPStrategy(_LightningDDP):
    """Lightning's ``ddp`` strategy whose ranks start through the ``kd-nnp`` CLI (above).

    After the job (:func:`finish`), the launching process waits for its ranks, leaves the
    process group and forgets the launch variables, so the next job of a sweep in the same
    process starts its own ranks.
    """

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _Launcher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            super()._configure_launcher()


def finish(trainer: Any, timeout_s: float = 600.0) -> None:
    """End a data-parallel job in the process that started its ranks (no-op otherwise):
    wait for the ranks it started, destroy the process group, drop the launch variables."""
    launcher = getattr(trainer.strategy, "launcher", None)
    procs = list(getattr(launcher, "procs", []) or [])
    if not procs:
        return
    failed = []
    for proc in procs:
        rc = proc.wait(timeout=timeout_s)
        if rc != 0:
            failed.append(f"pid {proc.pid}: exit {rc}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    launcher.procs = []
    if failed:
        raise RuntimeError(f"data-parallel ranks failed after the job: {failed}")


class UnpaddedSampler(DistributedSampler):
    """Validation/test indices of one rank: ``rank, rank + world, ...`` without padding (the
    ranks' counts differ by at most one; a rank may get none), so each frame counts once.
    A ``DistributedSampler``, so Lightning keeps it instead of injecting its padded one."""

    def __init__(self, data: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.n = len(data)
        self.num_samples = len(range(rank, self.n, num_replicas))
        self.total_size = self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

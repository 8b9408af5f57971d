"""Memory estimate of ``backend=full`` with forces, checked before training (issue D20).

chgnet's forces are an autograd derivative through the whole backbone, and training the MLP
on them keeps the graph of that derivative (``create_graph``): the memory of one step grows
with the number of atoms in the batch. Measured on this code (2026-11-27, CPU, one thread,
pyxtal test crystals of 16-40 atoms, ``predict_full`` with forces + backward, peak RSS above
the loaded student): 525 MB for a batch of 60 atoms, 1034 MB for 156 atoms, i.e. 5.3 MB per
additional atom and 6.6 MB per atom all in; other reports: 3.9 GB for 15 frames of 16-36
atoms, ~20 GB for a batch of 32 frames of 100 atoms. Larger frames cost more per atom
(more neighbours inside the cutoff of a larger cell): 8 test.db frames of 52-100 atoms (608
atoms) peaked at 5601 MB with forces (9.2 MB per atom) and 9268 MB with forces + stress
(15.2 MB per atom) (experiments/bench/bench_lean.py, 2026-11-28). The estimate takes the
larger figures: :data:`BYTES_PER_ATOM_FULL_FORCES` (9 MiB) and, with stress,
:data:`BYTES_PER_ATOM_FULL_STRESS` (15 MiB). The cached and lean backends do not have this
cost (docs/performance.md section 3).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kd_nnp.errors import KdNnpError

log = logging.getLogger(__name__)

BYTES_PER_ATOM_FULL_FORCES = 9 * 2**20
BYTES_PER_ATOM_FULL_STRESS = 15 * 2**20
# refuse (unless model.allow_memory_overcommit) when the estimate exceeds the available
# memory by more than this factor; between 1x and this factor: a warning
OVERCOMMIT_FACTOR = 1.5


def available_memory_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (Linux), else the physical memory (sysconf)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_full_backend_memory(
    datamodule: Any, module: Any, *, available: int | None = None
) -> dict[str, Any] | None:
    """Estimate the peak memory of the largest batch on the full backend with forces and
    compare it with the available memory; None when the run is not concerned (cached
    backend, or no forces). Warns when the estimate exceeds ``available``; raises
    :class:`KdNnpError` when it exceeds it by more than :data:`OVERCOMMIT_FACTOR`, unless
    ``module.allow_memory_overcommit`` (then a warning). The report goes into
    ``datamodule.summary["memory"]``."""
    if module.backend != "full" or not module.compute_forces:
        return None
    atoms = int(datamodule.max_batch_atoms())
    per_atom = BYTES_PER_ATOM_FULL_STRESS if module.compute_stress else BYTES_PER_ATOM_FULL_FORCES
    need = per_atom * atoms
    have = int(available if available is not None else available_memory_bytes())
    report = {"max_batch_atoms": atoms, "estimate_bytes": need, "available_bytes": have,
              "bytes_per_atom": per_atom}  # fmt: skip
    if getattr(datamodule, "summary", None) is not None:
        datamodule.summary["memory"] = report
    if need <= have:
        return report
    msg = (
        f"model.backend=full with forces: the largest batch ({atoms} atoms, data.batch_size="
        f"{datamodule.batch_size}) needs an estimated {need / 2**30:.1f} GiB "
        f"({per_atom / 2**20:.0f} MiB per atom) but {have / 2**30:.1f} GiB "
        "are available"
    )
    fix = "lower data.batch_size or data.max_atoms, or use model.backend=lean or cached"
    if need > OVERCOMMIT_FACTOR * have and not getattr(module, "allow_memory_overcommit", False):
        raise KdNnpError(f"{msg}; {fix} (or set model.allow_memory_overcommit=true to try anyway)")
    log.warning("%s: it may not fit; %s", msg, fix)
    if need > OVERCOMMIT_FACTOR * have:
        log.warning("going on because model.allow_memory_overcommit=true")
    return report

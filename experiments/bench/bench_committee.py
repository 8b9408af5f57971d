"""Committee calculator cost vs one student, side by side in one process (one thread).

    .venv/bin/python experiments/bench/bench_committee.py [--code KONTIQ] [--sizes 4 5]
        [--repeats 5]

On one crystal of pyxtal's ``test.db`` (default KONTIQ, 84 atoms), energy + forces + stress
per call (a fresh, slightly displaced copy each call, so nothing is cached), median of
``--repeats`` interleaved calls of:

- ``single``: one student (``InferenceCHGNetCalculator``, what ``student:PATH`` gives);
- ``committee``: :class:`~kd_nnp.teachers.committee.CommitteeCalculator` with K heads, the
  means and standard deviations of energy, forces and stress (one backbone forward, one
  batched backward of K position/strain gradients);
- ``mean_only``: the same with ``derivative_spread=False`` (one backward of the mean energy;
  per-head energies and ``energy_std`` only; what relaxations use before the spread at the
  end);
- ``k_singles``: K separate students (the cost a committee avoids).

Heads are the pretrained MLP with seeded perturbations (the cost does not depend on the
weights). Prints one table and the JSON of every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default="KONTIQ")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 5])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from ase.db import connect

    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator, load_chgnet
    from kd_nnp.teachers.committee import CommitteeCalculator, committee_blob, committee_model
    from kd_nnp.utils.paths import pyxtal_db
    from kd_nnp.utils.threads import set_threads

    set_threads(1)
    atoms = next(connect(pyxtal_db("test")).select(csd_code=args.code)).toatoms()
    base = load_chgnet()

    def call(calc, i: int) -> float:
        a = atoms.copy()
        a.positions += 1e-3 * (i + 1)
        a.calc = calc
        t = time.perf_counter()
        a.get_potential_energy()
        a.get_forces()
        a.get_stress()
        return time.perf_counter() - t

    rows = []
    single = InferenceCHGNetCalculator(copy.deepcopy(base))
    call(single, -1)  # warm-up
    for k in args.sizes:
        heads = []
        for j in range(k):
            h = copy.deepcopy(base.mlp)
            with torch.no_grad():
                for p in h.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(j)))
            heads.append(h)
        blob = committee_blob(base, heads, {}, {"size": k})
        full = CommitteeCalculator(committee_model(blob))
        lean = CommitteeCalculator(committee_model(blob), derivative_spread=False)
        call(full, -1)
        call(lean, -1)
        times: dict[str, list[float]] = {"single": [], "committee": [], "mean_only": []}
        for i in range(args.repeats):
            times["single"].append(call(single, i))
            times["committee"].append(call(full, i))
            times["mean_only"].append(call(lean, i))
        med = {name: statistics.median(v) for name, v in times.items()}
        rows.append(
            {
                "K": k,
                "atoms": len(atoms),
                "single_s": med["single"],
                "committee_s": med["committee"],
                "mean_only_s": med["mean_only"],
                "k_singles_s": k * med["single"],
                "ratio_committee": med["committee"] / med["single"],
                "ratio_mean_only": med["mean_only"] / med["single"],
                "load_1min": float(np.round(__import__("os").getloadavg()[0], 2)),
            }
        )
    print(f"{args.code}, energy + forces + stress per call, median of {args.repeats}, 1 thread")
    print("| K | atoms | single s | committee s (x) | mean-only s (x) | K singles s | load |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['K']} | {r['atoms']} | {r['single_s']:.3f} | {r['committee_s']:.3f} "
            f"({r['ratio_committee']:.2f}) | {r['mean_only_s']:.3f} ({r['ratio_mean_only']:.2f}) "
            f"| {r['k_singles_s']:.3f} | {r['load_1min']} |"
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

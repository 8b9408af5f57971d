"""Batched vs sequential relaxation on one device: the same crystals relaxed with
``RelaxSettings(backend="batched")`` twice in one run, ``batch_size`` crystals per CHGNet
forward and one crystal per forward (``batch_size=1``: the sequential loop on that device),
same protocol (kd_nnp's defaults), final volumes compared.

    .venv/bin/python experiments/bench/bench_batched_relax.py [--codes UREAXX02,OXALAC11]
        [--device cuda] [--batch-size 32] [--max-steps 2000]

:func:`time_batched_relax` is what a GPU check calls (``experiments/gpu/batched_relax_check.sh``).
On a CPU batching does not pay (docs/performance.md); it is meant for a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_batched_relax(
    codes: Sequence[str],
    device: str = "cpu",
    batch_size: int = 32,
    *,
    max_steps: int | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Seconds to relax the pyxtal ``test.db`` crystals ``codes`` with pretrained CHGNet on
    ``device``: batched (``batch_size`` per forward) and sequential (one per forward), after
    one warm-up forward (CUDA start-up is not timed); the ratio sequential / batched, the
    largest relative difference of the final volumes (0 when every trajectory is the same)
    and each run's forwards and seconds spent in them (``*_stats``): the rest is the
    per-crystal CPU work (graphs, LBFGS, cell filter) that batching does not share."""
    from kd_nnp.evaluation.batched import BatchedCHGNet
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import RelaxSettings
    from kd_nnp.evaluation.structures import load_dataset
    from kd_nnp.teachers.calculators import make_calculator
    from kd_nnp.utils.threads import set_threads

    set_threads()
    crystals = load_dataset("pyxtal:test", codes=list(codes))
    engine = BatchedCHGNet(make_calculator("chgnet").model, device)
    engine.evaluate([engine.graph(crystals[0].atoms)])  # warm-up: CUDA context, kernels
    steps = {} if max_steps is None else {"max_steps": max_steps}
    res: dict[str, Any] = {"codes": list(codes), "device": device, "batch_size": batch_size,
                           "natoms": {c.id: len(c.atoms) for c in crystals}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kd_bench_batched_") as tmp:
        root = Path(workdir or tmp)
        for name, bs in (("sequential", 1), ("batched", batch_size)):
            settings = RelaxSettings(backend="batched", batch_size=bs, device=device, rmsd=False,
                                     **steps)  # fmt: skip
            t0 = time.perf_counter()
            df = run_relax_benchmark(
                crystals, {"CHGNet": "chgnet"}, root / name, settings,
                references=False, progress=False, report=False,
            )  # fmt: skip
            res[f"{name}_s"] = time.perf_counter() - t0
            res[f"{name}_stats"] = df.attrs["batched"]  # forwards, forward_s, mean_batch
            res[name] = {
                r["id"]: {"volume": r["volume_pred"], "steps": r["steps"],
                          "converged": bool(r["converged"]), "status": r["status"]}
                for r in df.to_dict("records")
            }  # fmt: skip
    res["ratio"] = res["sequential_s"] / res["batched_s"]
    res["max_rel_volume_diff"] = max(
        abs(res["batched"][c]["volume"] / res["sequential"][c]["volume"] - 1)
        for c in res["batched"]
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", default="UREAXX02,OXALAC11")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    res = time_batched_relax(args.codes.split(","), args.device, args.batch_size,
                             max_steps=args.max_steps)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    n = len(res["batched"])
    print(f"{n} crystals on {res['device']}: sequential {res['sequential_s']:.1f} s, "
          f"batched (batch_size {res['batch_size']}) {res['batched_s']:.1f} s, "
          f"ratio {res['ratio']:.2f}x; final volumes differ by at most "
          f"{res['max_rel_volume_diff']:.1e} (relative)")  # fmt: skip
    for name in ("sequential", "batched"):
        st = res[f"{name}_stats"]
        print(f"  {name}: {st['forwards']} forwards (mean batch {st['mean_batch']:.2f}), "
              f"{st['forward_s']:.1f} s in them, {res[name + '_s'] - st['forward_s']:.1f} s "
              "elsewhere (graphs, LBFGS, filter, records, model load)")  # fmt: skip
    for c, r in res["batched"].items():
        print(f"  {c}: {res['natoms'][c]} atoms, {r['steps']} steps, V {r['volume']:.3f} A^3, "
              f"converged {r['converged']}")  # fmt: skip


if __name__ == "__main__":
    main()

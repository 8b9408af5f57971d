"""Where the remaining time goes: cProfile of cached-feature training epochs and of one
relaxation, one thread, top functions by own time and by cumulative time.

    .venv/bin/python experiments/bench/profile_hotspots.py --workdir outputs/bench/work
        [--epochs 20] [--crystal FORMAM] [--top 15]

``--workdir`` is a folder in which ``run_all.py`` (section training) left its store and
feature cache (``outputs/bench/work`` after ``make bench``); without one, the training
part is skipped. The relaxation uses kd_nnp's ``relax_structure`` with
``InferenceCHGNetCalculator`` (the protocol of ``run_relax_benchmark``, in-process).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _report(prof: cProfile.Profile, title: str, top: int, total: float) -> None:
    print(f"\n=== {title}: {total:.2f} s wall ===")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        lines = buf.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        print(f"--- top {top} by {key}")
        print("\n".join(lines[start : start + top + 1]))


def profile_training(workdir: Path, epochs: int, top: int) -> None:
    import os

    import bench_training as bt

    stores = sorted((workdir / "stores").glob("*/bench_info.json"))
    cache = workdir / "train_cache"
    if not stores or not cache.is_dir():
        print(f"no training store/cache under {workdir}: run run_all.py --only training first")
        return
    os.environ["KD_NNP_CACHE"] = str(cache)
    cfg = {"store": str(stores[-1].parent), "batch_size": 3, "epochs": epochs}
    from kd_nnp.training.cache.attach import attach_feature_cache

    dm = bt._datamodule(cfg)
    dm.setup("fit")
    module = bt._module("cached")
    stats = attach_feature_cache(dm, module, prebuild=True)
    print(f"training store {cfg['store']}: {len(dm.train_samples)} frames, cache {stats}")
    trainer = bt._lightning_trainer(epochs, [])
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    trainer.fit(module, datamodule=dm)
    prof.disable()
    _report(prof, f"{epochs} cached epochs (lightning fit)", top, time.perf_counter() - t)


def profile_relax(code: str, top: int) -> None:
    from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals
    from kd_nnp.evaluation.protocol import relax_structure
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator

    ((_, atoms),) = pyxtal_crystals("test", codes=[code])
    calc = InferenceCHGNetCalculator()
    calc.get_potential_energy(atoms.copy())  # warm-up
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = relax_structure(atoms, calc)
    prof.disable()
    total = time.perf_counter() - t
    title = f"relax_structure {code} ({len(atoms)} atoms, {info['steps']} steps, {info['rounds']} rounds)"
    _report(prof, title, top, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="outputs/bench/work")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--crystal", default="FORMAM")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    from kd_nnp.utils.threads import set_threads

    set_threads(1)
    print(f"load avg {common.load_average()}")
    profile_training(Path(args.workdir).resolve(), args.epochs, args.top)
    profile_relax(args.crystal, args.top)


if __name__ == "__main__":
    main()

"""``make bench``: kd_nnp's performance benchmarks in one command, one table.

    .venv/bin/python experiments/bench/run_all.py [--quick] [--only training,sweep,relax,labelling,lean]
        [--gfn2] [--out outputs/bench]

Sections (each measured side by side in one run, one thread per process, every memory
figure from its own process; a failing section is reported in the table and the others
still run):

- ``training``  chgnet's ``Trainer`` vs kd_nnp's cached-feature and full backends on the same
  perturbed test.db frames: epoch times, one-time feature build, step-0 loss and MLP
  gradients, peak RSS, memory extrapolated to 1000 frames (bench_training.py);
- ``cache``     build seconds and MB per frame of the exact derivative caches: all 3N
  position directions vs M = 2/4/8 force atoms vs the 6 strain directions, at ~50/100/200
  atoms; an E+F+S epoch of chgnet's Trainer vs the cached M=4 + strain path (bench_cache.py);
- ``sweep``     ``kd-nnp train -m`` over loss.r_he x loss.r_hf (5 x 5) vs one job, cold and
  warm shared caches (bench_sweep.py);
- ``relax``     ``run_relax_benchmark`` (2 workers) vs a sequential ASE loop, final volumes,
  and the two CHGNet calculators' single-point speed (bench_relax.py);
- ``labelling`` frames/s and peak RSS per offline teacher (bench_labelling.py);
- ``lean``      a training step (E+F+S) of ``model.backend=lean`` vs ``full`` at batch 8/16/32
  of 52-100-atom frames: step time, peak memory, step-0 loss and gradients (bench_lean.py;
  only with ``--only lean``: ~10 min, ~10 GB).

Writes ``bench.json`` (everything, including per-child logs' paths and errors) and
``bench.md`` (the table) to ``--out`` (``bench_quick.*`` with ``--quick``); the work files
(stores, caches, logs) go to ``<out>/work`` (``<out>/work_quick``). ``--quick`` is a smoke version (< 3 min on 2
cores): tiny frames, a 2 x 2 sweep, two crystals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cache  # noqa: E402
import bench_labelling  # noqa: E402
import bench_lean  # noqa: E402
import bench_relax  # noqa: E402
import bench_sweep  # noqa: E402
import bench_training  # noqa: E402
import common  # noqa: E402

SECTIONS = ("training", "cache", "sweep", "relax", "labelling", "lean")
# ``lean`` (~10 min, ~10 GB for full at batch 8) runs only when named: --only lean
DEFAULT_SECTIONS = ("training", "cache", "sweep", "relax", "labelling")

# Training frames: 3 test.db crystals x (1 strained + 1 strained-and-rattled copy). The
# one-time feature build is O(N x bonds) (~7-60 s per 50-100-atom frame on this machine)
# and is paid twice (training section + the sweep's cold job): that sets the sizes.
FULL = {
    "training": {"codes": ["BENZEN", "NACJAF", "ACSALA"], "n_strain": 1, "n_rattle": 1,
                 "batch_size": 3, "epochs": 3},
    "cache": {"codes": ["FIQSEG", "WIDBAO", "FLUANT"], "schemes": list(bench_cache.SCHEMES),
              "full_limit_directions": 320, "epoch_codes": ["BENZEN", "NACJAF", "ACSALA"],
              "batch_size": 3, "epochs": 3, "force_atoms": 4},
    "sweep": {"grid": [0.1, 0.3, 1.0, 3.0, 10.0], "epochs": 3},
    "relax": {"codes": ["UREAXX02", "FORMAM", "NAPHTA15", "BIPHEN"], "workers": 2,
              "repeats": 3, "ase_inference": True},
    "labelling": {"teachers": ["so3lr", "chgnet_d3"], "codes": ["KONTIQ", "WIDBAO"], "n": 6,
                  "gfn2_n": 1},
    "lean": {"batch_sizes": [8, 16, 32], "steps": 3},
}  # fmt: skip
QUICK = {
    "training": {"codes": ["OXALAC11", "UREAXX02"], "n_strain": 1, "n_rattle": 1,
                 "batch_size": 2, "epochs": 2},
    "cache": {"codes": ["UREAXX02"], "schemes": list(bench_cache.SCHEMES),
              "full_limit_directions": 320, "epoch_codes": ["OXALAC11", "UREAXX02"],
              "batch_size": 2, "epochs": 2, "force_atoms": 4},
    "sweep": {"grid": [0.1, 10.0], "epochs": 2},
    "relax": {"codes": ["UREAXX02", "OXALAC11"], "workers": 2, "repeats": 2,
              "ase_inference": True},
    "labelling": {"teachers": ["so3lr", "chgnet_d3"], "codes": ["UREAXX02"], "n": 2,
                  "gfn2_n": 1},
    "lean": {"batch_sizes": [2], "steps": 2},
}  # fmt: skip


def _section_cfg(name: str, plan: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(plan[name])
    if name == "sweep":  # the same frames, batch size as the training section
        for key in ("codes", "n_strain", "n_rattle", "batch_size"):
            cfg[key] = plan["training"][key]
    return cfg


MODULES = {
    "training": bench_training,
    "cache": bench_cache,
    "sweep": bench_sweep,
    "relax": bench_relax,
    "labelling": bench_labelling,
    "lean": bench_lean,
}


def run_section(name: str, cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one section; never raises (a failure becomes a FAILED row)."""
    rec: dict[str, Any] = {"config": cfg, "load_before": common.load_average()}
    t = time.perf_counter()
    print(f"[{name}] {json.dumps(cfg)}", flush=True)
    try:
        rec["result"] = MODULES[name].run(cfg, workdir)
        rec["rows"] = MODULES[name].rows(rec["result"])
    except Exception as exc:  # noqa: BLE001 - reported in the table
        rec["error"] = common.error_summary(exc)
        rec["traceback"] = common.format_exc(exc)
        rec["rows"] = [{"section": name, "what": "section", "value": "FAILED",
                        "compare": rec["error"], "ok": False}]  # fmt: skip
    rec["wall_s"] = time.perf_counter() - t
    rec["load_after"] = common.load_average()
    lb, la = rec["load_before"], rec["load_after"]
    rec["rows"].append({"section": name, "what": "section wall time; load avg 1/5/15 min",
                        "value": f"{rec['wall_s']:.0f} s",
                        "compare": f"load {lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f} before, "
                                   f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} after",
                        "ok": None})  # fmt: skip
    print(f"[{name}] done in {rec['wall_s']:.0f} s", flush=True)
    return rec


def _status(row: dict[str, Any]) -> str:
    if row["value"] == "FAILED":
        return "FAILED"
    return {True: "met", False: "MISSED", None: ""}[row["ok"]]


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ("section", "measurement", "value", "target", "details")
    cells = [(r["section"], r["what"], r["value"], _status(r), r["compare"]) for r in rows]
    if markdown:
        esc = [tuple(str(c).replace("|", "\\|") for c in row) for row in cells]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in esc]
        return "\n".join(lines)
    widths = [max(len(str(x[i])) for x in [head, *cells]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths), "-" * 7)]
    prev = None
    for row in cells:
        if prev is not None and row[0] != prev:
            lines.append("")
        lines.append(fmt.format(*row))
        prev = row[0]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke version (< 3 min)")
    ap.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated sections of {','.join(SECTIONS)} "
                         f"(default {','.join(DEFAULT_SECTIONS)})")  # fmt: skip
    ap.add_argument("--gfn2", action="store_true", help="also label with GFN2-xTB (slow)")
    ap.add_argument("--out", default="outputs/bench", help="folder of bench.json / bench.md")
    ap.add_argument("--epochs", type=int, default=None, help="override training/sweep epochs")
    ap.add_argument("--train-codes", default=None,
                    help="test.db csd codes of the training/sweep frames (comma separated; "
                         "2 frames each), e.g. KONTIQ,WIDBAO for ~100-atom frames")  # fmt: skip
    ap.add_argument("--device", default="cpu",
                    help="device of the cache section's builds (cuda: GPU build rows only)")  # fmt: skip
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    plan = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.gfn2:
        plan["labelling"]["teachers"].append("gfn2")
    if args.epochs:
        plan["training"]["epochs"] = plan["sweep"]["epochs"] = args.epochs
    plan["cache"]["device"] = args.device
    if args.train_codes:
        plan["training"]["codes"] = args.train_codes.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = (out / ("work_quick" if args.quick else "work")).resolve()
    tag = "bench_quick" if args.quick else "bench"
    for var in (*common.THREAD_ENV, "KD_NNP_THREADS"):  # children inherit one thread
        os.environ[var] = "1"

    machine = common.machine_info()
    cmd = "python experiments/bench/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"kd_nnp benchmarks ({'quick' if args.quick else 'full'}): {', '.join(only)}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM; "
          f"load avg {machine['load_avg']}; {machine['date']}; kd_nnp at {machine['git_commit']}"
          + (f" + uncommitted {machine['kd_nnp_uncommitted']}"
             if machine["kd_nnp_uncommitted"] else ""), flush=True)  # fmt: skip
    t0 = time.perf_counter()
    sections = {}
    for name in only:
        sections[name] = run_section(name, _section_cfg(name, plan), workdir)
    total = time.perf_counter() - t0
    rows = [r for name in only for r in sections[name]["rows"]]
    load_end = common.load_average()
    table = format_table(rows, markdown=False)
    print("\n" + table)
    print(f"\ntotal {total:.0f} s; load avg at the end {[round(x, 2) for x in load_end]}")
    record = {
        "command": cmd.strip(),
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "total_s": total,
        "load_avg_end": load_end,
        "rows": rows,
        "sections": sections,
    }
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1, default=str))
    md = [
        f"# kd_nnp benchmarks ({record['mode']})",
        "",
        f"`{record['command']}` on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['ram_gb']} GB RAM, {machine['date']}, kd_nnp at {machine['git_commit']}"
        + (
            f" + uncommitted changes in {', '.join(machine['kd_nnp_uncommitted'])}"
            if machine["kd_nnp_uncommitted"]
            else ""
        )
        + "; load average at the start "
        f"{machine['load_avg']}, at the end {[round(x, 2) for x in load_end]}; total "
        f"{total:.0f} s. One thread per process. Targets: met / MISSED; FAILED = the "
        "measurement did not run (see bench.json).",
        "",
        format_table(rows, markdown=True),
        "",
    ]
    (out / f"{tag}.md").write_text("\n".join(md))
    print(f"wrote {out / f'{tag}.json'} and {out / f'{tag}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

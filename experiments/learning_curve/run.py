"""Learning curve of a generated corpus (the offline analogue of the paper's Fig. 4).

Students distilled with the demo's recipe (``conf/demo.yaml``: soft energies, only the MLP
trains, exact cached features) from the demo's experimental-crystal frames plus the frames of
0 / n1 / n2 / ... molecules of a generated corpus (``kd-nnp data generate``: each molecule's
random packings relaxed by the teacher, trajectories as frames), each judged on the demo's
held-out experimental crystals against the teacher and pretrained CHGNet::

    python experiments/learning_curve/run.py --demo-out outputs/demo \\
        --generated stores/generated --molecules 0,25,50 --out outputs/learning_curve \\
        [--workers 2] [--seed 0] [--baselines outputs/demo/relax] [OVERRIDE ...]

- ``--demo-out``: a finished ``make demo`` / ``kd-nnp demo`` output (its ``store/``,
  ``crystals.json`` and ``heldout_molecules.json``). Its store and the corpus must hold one
  label set of the same teacher with the same settings (checked, as ``kd-nnp data merge`` does).
- Arm n trains on the demo store plus the corpus frames of the first n molecules (group ids) of
  a seeded order, nested (the 25 are among the 50). Molecules of the held-out crystals are never
  drawn, and the leakage guard (``data.exclude_molecules`` = the demo's held-out file) drops any
  frame that still carries one; the counts are in each arm's ``train/data_summary.json``.
- OVERRIDEs are ``kd-nnp train`` overrides of the recipe (e.g. ``trainer.max_epochs=100``), the
  same for every arm.
- ``--baselines``: where pretrained CHGNet's and the teacher's relaxations of the held-out
  crystals are (or go); the demo's ``relax/`` folder already holds them (same protocol:
  nothing is recomputed).
- Outputs under ``--out``: ``stores/m<n>`` (demo + corpus subset), ``m<n>/train`` (the run),
  ``m<n>/relax`` (the student's relaxations), ``lattice/`` (lattice energies of every
  method on the held-out crystals, from the same relaxed crystals and each molecule relaxed
  alone, reference = the teacher; ``relax_all/`` gathers the relaxations it reads),
  ``per_crystal.csv``, ``learning_curve.json`` / ``.md`` and ``learning_curve.png``. Every stage resumes (store copy, training, relaxation JSON lines);
  a rerun with another corpus, order or demo for the same ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_nnp.errors import KdNnpError

CHGNET = "CHGNet (pretrained)"


def student_label(n: int) -> str:
    return f"student (+{n} generated molecules)"


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KdNnpError(f"--molecules must be comma-separated integers, got {text!r}") from None
    if not counts or any(c < 0 for c in counts) or len(set(counts)) != len(counts):
        raise KdNnpError(f"--molecules must be distinct integers >= 0, got {text!r}")
    return sorted(counts)


def corpus_order(generated: Any, heldout: set[str], seed: int) -> tuple[list[str], list[str]]:
    """``(order, held_out_groups)``: the corpus' molecule groups in a seeded order, less those
    that are a held-out molecule (listed second)."""
    groups = sorted({str(f.group_id) for f in generated.iter_frames()})
    held = [g for g in groups if g in heldout]
    usable = [g for g in groups if g not in heldout]
    rng = np.random.default_rng(seed)
    return [usable[i] for i in rng.permutation(len(usable))], held


def build_arm_store(
    out: Path, demo_store: Any, generated: Any, groups: list[str], label_set: str
) -> Path:
    """The demo's frames and labels plus the corpus frames (and labels) of ``groups``, written
    to a temporary folder and renamed when complete (a killed copy is redone, never half used);
    ``lc_store.json`` records what it holds."""
    from kd_nnp.data.sources.merge import same_teacher
    from kd_nnp.data.store import FrameStore

    record = {
        "demo_store": str(demo_store.root.resolve()),
        "generated": str(generated.root.resolve()),
        "groups": sorted(groups),
        "label_set": label_set,
    }
    if out.exists():
        have = json.loads((out / "lc_store.json").read_text())
        if have != record:
            raise KdNnpError(f"{out} holds another subset or other sources: delete it or use "
                             "another --out")  # fmt: skip
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dest = FrameStore(tmp, create=True, description=f"learning curve: demo + {len(groups)} "
                      "generated molecules")  # fmt: skip
    chosen = set(groups)
    gen_frames = [f for f in generated.iter_frames() if str(f.group_id) in chosen]
    prov = same_teacher(label_set, [(str(demo_store.root), demo_store.labels(label_set)),
                                    (str(generated.root), generated.labels(label_set))])  # fmt: skip
    demo_frames = list(demo_store.iter_frames())
    dest.add_frames(demo_frames)
    dest.add_frames(gen_frames)
    target = dest.labels(label_set, create=True)
    with target.writer_lock():
        target.set_provenance(prov)
        for src, frames in ((demo_store, demo_frames), (generated, gen_frames)):
            ok = src.labels(label_set).load([f.frame_id for f in frames])
            target.write([(f, ok[f.frame_id], None, 0.0) for f in frames if f.frame_id in ok])
    (tmp / "lc_store.json").write_text(json.dumps(record, indent=1))
    tmp.rename(out)
    return out


def compose_demo(overrides: list[str]) -> Any:
    """The demo's config (``conf/demo.yaml``) with ``overrides``: its recipe trains every arm
    (:func:`kd_nnp.evaluation.cv.fold_config`), its ``demo.relax`` relaxes the crystals."""
    from hydra import compose, initialize_config_dir

    from kd_nnp.utils.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("demo", overrides=overrides)


def crystal_counts(store: Any) -> tuple[int, int]:
    """``(crystals, frames)`` of generated frames in ``store`` (ids ``gen:<mol>/p<k>/s<step>``)."""
    ids = [f for f in store.frame_ids() if f.startswith("gen:")]
    return len({f.rsplit("/", 1)[0] for f in ids}), len(ids)


def _num(x: Any) -> float | None:
    return None if x is None or not np.isfinite(float(x)) else float(x)


def method_rows(df: pd.DataFrame, teacher: str) -> dict[str, dict[str, Any]]:
    """Per method (the demo's statistics, :func:`kd_nnp.evaluation.stats.summarize`): n,
    failures, volume MAE with its bootstrap 95 % interval, signed mean, and the crystal-by-crystal
    distance to ``teacher`` (mean |dV - dV_teacher| over crystals both relaxed)."""
    from kd_nnp.evaluation.stats import bootstrap_ci, paired_volume_distance, summarize

    rows = {}
    for r in summarize(df).to_dict("records"):
        method = str(r["method"])
        ok = df[(df["method"] == method) & (df["status"] == "ok")]
        v = ok["vol_err_pct"].astype(float)
        lo, hi = bootstrap_ci(v, seed=0) if len(v) else (math.nan, math.nan)
        d = paired_volume_distance(df, method, teacher)
        rows[method] = {
            "n": int(r["n_covered"]), "n_crystals": int(r["n_crystals"]),
            "failures": int(r["n_failures"]),
            "vol_mae_pct": float(r["vol_mae_pct"]), "vol_mae_ci95_pct": [float(lo), float(hi)],
            "vol_mean_pct": float(r["vol_mean_pct"]),
            "to_teacher_pct": d["mean_abs_pct"], "to_teacher_n": d["n"],
            "per_crystal_pct": {str(k): float(x) for k, x in zip(ok["id"], v)},
        }  # fmt: skip
    return rows


def _lattice_cell(row: dict[str, Any]) -> str:
    mae, diff = row.get("lattice_mae_vs_teacher"), row.get("lattice_mean_diff")
    if mae is None:
        return ""
    fails = row.get("lattice_failures") or 0
    return f"{mae:.1f} ({diff:+.1f})" + (f", {fails} failed" if fails else "")


def markdown(arms: list[dict[str, Any]], base: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | generated crystals (molecules) | training frames | train s | n | failures "
        "| volume MAE % [95 %] | signed mean % | to teacher % | E_latt MAE vs teacher kJ/mol "
        "(mean diff) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        lo, hi = a["vol_mae_ci95_pct"]
        lines.append(
            f"| {a['label']} | {a['crystals']} ({a['molecules']}) | {a['n_train']} | "
            f"{a['train_s']:.0f} | {a['n']} | {a['failures']} | {a['vol_mae_pct']:.2f} "
            f"[{lo:.2f}, {hi:.2f}] | {a['vol_mean_pct']:+.2f} | {a['to_teacher_pct']:.2f} | "
            f"{_lattice_cell(a)} |"
        )
    for label, b in base.items():
        lo, hi = b["vol_mae_ci95_pct"]
        lines.append(f"| {label} | | | | {b['n']} | {b['failures']} | {b['vol_mae_pct']:.2f} "
                     f"[{lo:.2f}, {hi:.2f}] | {b['vol_mean_pct']:+.2f} | "
                     f"{b['to_teacher_pct']:.2f} | {_lattice_cell(b)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], base: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["crystals"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [r["vol_mae_pct"] for r in rows], "o-", label="student: volume MAE")
    ax.plot(x, [r["to_teacher_pct"] for r in rows], "s--", label="student: distance to teacher")
    for label, b in base.items():
        ax.axhline(b["vol_mae_pct"], ls=":", color="grey" if "CHGNet" in label else "k")
        ax.annotate(label, (x[-1], b["vol_mae_pct"]), ha="right", va="bottom", fontsize=7)
    ax.set_xlabel("generated crystals added to the demo's frames")
    ax.set_ylabel("held-out volume, %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from kd_nnp.data.store import FrameStore
    from kd_nnp.evaluation.cv import cv_crystals, fold_config, teacher_label
    from kd_nnp.evaluation.lattice import run_lattice_benchmark, summarize_lattice
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import LatticeSettings, RelaxSettings
    from kd_nnp.teachers.label import resolve_label_set
    from kd_nnp.training.train import run_training
    from kd_nnp.utils.settings import from_mapping
    from kd_nnp.utils.threads import set_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-out", required=True, type=Path)
    p.add_argument("--generated", required=True, type=Path)
    p.add_argument(
        "--molecules",
        default="0,25,50",
        type=parse_counts,
        help="generated molecules per arm, comma-separated (0 = the demo alone)",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="order of the corpus' molecules")
    p.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help="relaxation folder of CHGNet and the teacher (default OUT/baselines)",
    )
    p.add_argument("overrides", nargs="*", help="kd-nnp train overrides of the demo's recipe")
    a = p.parse_args(argv)
    set_threads(1)

    demo_out = a.demo_out.resolve()
    for name in ("store", "crystals.json", "heldout_molecules.json"):
        if not (demo_out / name).exists():
            raise KdNnpError(f"--demo-out {demo_out} has no {name}: run `make demo` (or "
                             "`kd-nnp demo`) first")  # fmt: skip
    demo_store, generated = FrameStore(demo_out / "store"), FrameStore(a.generated)
    demo_cfg = compose_demo(a.overrides)
    teacher = str(demo_cfg.demo.teacher)
    # a module:factory teacher's label set is stored under label_set_name(spec)
    label_set = resolve_label_set(demo_store, str(demo_cfg.data.label_set))
    for s in (demo_store, generated):
        if label_set not in s.label_names():
            raise KdNnpError(f"{s.root} has no label set {label_set!r} (it has "
                             f"{s.label_names()}); label it with that teacher first")  # fmt: skip
    heldout = set(json.loads((demo_out / "heldout_molecules.json").read_text())["molecules"])
    eval_ids = json.loads((demo_out / "crystals.json").read_text())["eval"]
    order, held_groups = corpus_order(generated, heldout, a.seed)
    if a.molecules[-1] > len(order):
        raise KdNnpError(
            f"--molecules asks for {a.molecules[-1]} but {a.generated} has only "
            f"{len(order)} usable molecules ({len(held_groups)} more are held out)"
        )
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    record = {"demo_out": str(demo_out), "generated": str(generated.root.resolve()),
              "seed": a.seed, "order": order}  # fmt: skip
    rec_path = out / "learning_curve_inputs.json"
    if rec_path.exists() and json.loads(rec_path.read_text()) != record:
        raise KdNnpError(f"{out} was made from another demo, corpus or seed "
                         f"({rec_path}); use another --out")  # fmt: skip
    rec_path.write_text(json.dumps(record, indent=1))

    crystals, _ = cv_crystals(["test", "mech"], None, eval_ids)
    relax = from_mapping(RelaxSettings, OmegaConf.to_container(demo_cfg.demo.relax, resolve=True),
                         where="demo.relax")  # fmt: skip
    print(f"learning curve: {len(order)} usable corpus molecules ({len(held_groups)} held out); "
          f"arms {a.molecules}; {len(crystals)} held-out crystals")  # fmt: skip

    arms: list[dict[str, Any]] = []
    frames = []
    for n in a.molecules:
        label = student_label(n)
        store = demo_out / "store" if n == 0 else build_arm_store(
            out / "stores" / f"m{n}", demo_store, generated, order[:n], label_set)  # fmt: skip
        n_cryst, n_gen = crystal_counts(FrameStore(store))
        run_dir = out / f"m{n}" / "train"
        t = time.perf_counter()
        print(f"[m{n}] training on {store} ({n_cryst} generated crystals, {n_gen} frames)",
              flush=True)  # fmt: skip
        exclude = demo_out / "heldout_molecules.json"
        metrics = run_training(fold_config(demo_cfg, store, exclude, run_dir), run_dir)
        # the training job's own record (data, feature build and fit), not this call's time: a
        # rerun finds the job done and would report ~1 s
        train_s = sum((metrics.get("time_s") or {}).values()) or time.perf_counter() - t
        t = time.perf_counter()
        frames.append(run_relax_benchmark(
            crystals, {label: f"student:{metrics['student']}"}, out / f"m{n}" / "relax", relax,
            workers=a.workers, references=False, progress=False))  # fmt: skip
        final = metrics.get("final") or {}
        arms.append({
            "label": label, "molecules": n, "crystals": n_cryst, "frames_generated": n_gen,
            "n_train": metrics.get("n_train"), "n_val": metrics.get("n_val"),
            "excluded_frames": (metrics.get("excluded") or {}).get("n_frames"),
            "train_s": train_s, "relax_s": time.perf_counter() - t,
            "student": metrics["student"],
            "train_soft_e_mae": final.get("train/mae_soft_energy"),
            "val_soft_e_mae": final.get("val/mae_soft_energy"),
        })  # fmt: skip

    tl = teacher_label(teacher)
    base_dir = (a.baselines or out / "baselines").resolve()
    base = run_relax_benchmark(crystals, {CHGNET: "chgnet", tl: f"teacher:{teacher}"}, base_dir,
                               relax, workers=a.workers, references=False, progress=False,
                               report=a.baselines is None)  # fmt: skip
    df = pd.concat([*frames, base], ignore_index=True)
    df.to_csv(out / "per_crystal.csv", index=False)
    stats = method_rows(df, tl)
    for arm in arms:
        arm.update(stats[arm["label"]])
    baselines = {label: stats[label] for label in (CHGNET, tl)}

    # lattice energies (kJ/mol per molecule) of every method on the held-out crystals: the
    # crystals relaxed above (their JSON lines gathered into one folder, nothing relaxed twice)
    # and each distinct molecule relaxed alone in a box; reference = the teacher
    gathered = out / "relax_all"
    gathered.mkdir(exist_ok=True)
    lines = [(out / f"m{arm['molecules']}" / "relax" / "relax.jsonl") for arm in arms]
    text = "".join(p.read_text() for p in [*lines, base_dir / "relax.jsonl"])
    (gathered / "relax.jsonl.tmp").write_text(text)
    (gathered / "relax.jsonl.tmp").replace(gathered / "relax.jsonl")
    methods = {arm["label"]: f"student:{arm['student']}" for arm in arms}
    methods.update({CHGNET: "chgnet", tl: f"teacher:{teacher}"})
    lattice = from_mapping(LatticeSettings, OmegaConf.to_container(demo_cfg.demo.lattice,
                           resolve=True), where="demo.lattice")  # fmt: skip
    ldf = run_lattice_benchmark(crystals, methods, out / "lattice", relax, lattice,
                                relax_dir=gathered, workers=a.workers, progress=False)  # fmt: skip
    lat = summarize_lattice(ldf, tl).set_index("method")
    for label, row in {**{arm["label"]: arm for arm in arms}, **baselines}.items():
        r = lat.loc[label] if label in lat.index else None
        row["lattice_mae_vs_teacher"] = None if r is None else _num(r.get("mae"))
        row["lattice_mean_diff"] = None if r is None else _num(r.get("mean_diff"))
        row["lattice_failures"] = None if r is None else int(r.get("failures", 0))
    result = {"teacher": teacher, "heldout": eval_ids, "overrides": a.overrides, "arms": arms,
              "baselines": baselines, "held_out_corpus_molecules": held_groups}  # fmt: skip
    (out / "learning_curve.json").write_text(json.dumps(result, indent=2, default=str))
    table = markdown(arms, baselines)
    (out / "learning_curve.md").write_text(table)
    plot(arms, baselines, out / "learning_curve.png")
    print(table)
    return result


if __name__ == "__main__":
    try:
        run(sys.argv[1:])
    except KdNnpError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)

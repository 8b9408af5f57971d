"""Active vs random selection of teacher labels at equal budget (issue 12), on held-out volumes.

    python experiments/active/run.py --pool STORE --out DIR --eval-codes ACETAC01,BENZEN
        [--teacher chgnet_d3] [--initial 20] [--step 20] [--rounds 3] [--committee 2]
        [--epochs 30] [--seed 0] [--max-per-group M]

``--pool``: a frames store of unlabelled perturbations of many crystals (``kd-nnp data pyxtal``
then ``kd-nnp data perturb``). Two arms, each its own label set of the pool
(``<teacher>_<hash>_active``, ``<teacher>_<hash>_random``; the hash of the arguments the picks
depend on, so runs with other ones never share a label set). Round r has the label budget
``initial + r * step``; each round labels up to that budget (``label_store`` with
``select.n``: round 0 random in both arms with the same seed, so both start from the same
frames; later rounds by the disagreement of the previous round's committee, or at random),
trains a committee of ``--committee`` heads on the arm's labelled frames (soft energies,
cached features, ``data.use_hard=false``) and relaxes the held-out crystals (pyxtal
``test.db`` codes; any whose molecular formula occurs in the pool is refused) with the
committee mean. One line per (arm, round) goes to ``DIR/results.jsonl``: budget, volume MAE
(%), mean signed volume error and the per-crystal errors; a table is printed at the end.

Resumable: labelling resumes its recorded round, a finished training run is skipped
(``skip_if_done``), finished relaxations are kept; ``DIR/recipe.json`` refuses a rerun with
other arguments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RECIPE_KEYS = ("pool", "eval_codes", "teacher", "initial", "step", "rounds", "committee",
               "epochs", "seed", "lr", "fmax", "max_per_group")  # fmt: skip
#: what the labels an arm picks depend on: its label sets are named by their hash, so runs
#: with other such arguments on one pool never share (and silently reuse) a label set
SELECTION_KEYS = ("teacher", "initial", "step", "committee", "epochs", "seed", "lr",
                  "max_per_group")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True, help="frames store of unlabelled frames")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--eval-codes", required=True, help="held-out pyxtal test.db codes, A,B,...")
    ap.add_argument("--teacher", default="chgnet_d3")
    ap.add_argument("--initial", type=int, default=20, help="label budget of round 0")
    ap.add_argument("--step", type=int, default=20, help="labels added per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--committee", type=int, default=2, help="heads per committee (>= 2)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--fmax", type=float, default=0.05, help="relaxation force threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-per-group", type=int, default=None,
                    help="active arm: at most M picks of one crystal per round (select.max_per_group)")  # fmt: skip
    return ap.parse_args(argv)


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from kd_nnp.utils.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def eval_crystals(codes: list[str], pool: Any) -> list[tuple[str, Any]]:
    from ase.db import connect

    from kd_nnp.errors import KdNnpError
    from kd_nnp.utils.paths import pyxtal_db

    db = connect(pyxtal_db("test"))
    seen = {fr.atoms.get_chemical_formula(empirical=True) for fr in pool.iter_frames()}
    out = []
    for code in codes:
        rows = list(db.select(csd_code=code))
        if not rows:
            raise KdNnpError(f"--eval-codes: {code} is not in pyxtal's test.db")
        atoms = rows[0].toatoms()
        if atoms.get_chemical_formula(empirical=True) in seen:
            raise KdNnpError(f"--eval-codes: {code}'s molecule occurs in the pool: not held out")
        out.append((code, atoms))
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kd_nnp.data.store import FrameStore, label_set_name
    from kd_nnp.errors import KdNnpError
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import RelaxSettings
    from kd_nnp.teachers.label import label_store
    from kd_nnp.teachers.select import SelectSettings
    from kd_nnp.training.train import run_training
    from kd_nnp.utils.jsonl import append_jsonl, read_jsonl
    from kd_nnp.utils.provenance import stable_hash
    from kd_nnp.utils.threads import set_threads

    set_threads(1)
    if args.committee < 2:
        raise KdNnpError("--committee must be >= 2 (disagreement needs two heads)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    recipe["pool"] = str(Path(args.pool).resolve())
    rpath = out / "recipe.json"
    if rpath.is_file() and json.loads(rpath.read_text()) != recipe:
        raise KdNnpError(f"{out} holds a run with other arguments ({rpath}); use another --out")
    pool = FrameStore(args.pool)
    crystals = eval_crystals([c for c in args.eval_codes.split(",") if c], pool)
    rpath.write_text(json.dumps(recipe, indent=2))  # inputs checked: a refused run records none
    results = out / "results.jsonl"
    done = {(r["arm"], r["round"]) for r in read_jsonl(results)}
    relax = RelaxSettings(fmax=args.fmax)
    tag = stable_hash({k: getattr(args, k) for k in SELECTION_KEYS}, length=8)
    base = f"{label_set_name(args.teacher)}_{tag}"
    for arm in ("active", "random"):
        name = f"{base}_{arm}"
        prev: Path | None = None
        for r in range(args.rounds):
            budget = args.initial + r * args.step
            if arm == "active" and prev is not None:
                sel = SelectSettings(n=budget, by="committee", committee=str(prev),
                                     max_per_group=args.max_per_group)  # fmt: skip
            else:
                sel = SelectSettings(n=budget, seed=args.seed)
            rep = label_store(args.pool, args.teacher, name=name, select=sel, progress=False)
            print(f"[{arm} round {r}] {rep.summary()}")
            run_dir = out / arm / f"round{r}"
            cfg = _compose([
                f"data.store={recipe['pool']}", f"data.label_set={name}", "data.use_hard=false",
                "data.grouped=false", "data.batch_size=8", "model.compute_forces=false",
                "loss.r_sf=0", "model.backend=cached", f"model.optimizer.lr={args.lr}",
                f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
                f"committee.size={args.committee}", f"seed={args.seed}",
                "validate_before_training=false", "~callbacks", "~logger",
                f"paths.output_dir={out}",
            ])  # fmt: skip
            metrics = run_training(cfg, run_dir)
            prev = Path(metrics["student"])
            if (arm, r) in done:
                continue
            df = run_relax_benchmark(
                crystals, {"student": f"student:{prev}"}, run_dir / "relax", relax,
                workers=1, references=False, report=False, progress=False,
            )  # fmt: skip
            ok = df[(df["method"] == "student") & (df["status"] == "ok")]
            err = {str(k): float(v) for k, v in zip(ok["id"], ok["vol_err_pct"], strict=True)}
            n_labelled = len(FrameStore(args.pool).labels(name).status())
            rec = {
                "arm": arm, "round": r, "budget": budget, "n_labelled": n_labelled,
                "n_eval": len(crystals), "n_ok": len(err),
                "vol_mae_pct": sum(abs(v) for v in err.values()) / max(len(err), 1),
                "vol_mean_pct": sum(err.values()) / max(len(err), 1),
                "vol_err_pct": err,
            }  # fmt: skip
            append_jsonl(results, rec)
            print(f"[{arm} round {r}] budget {budget}: volume MAE {rec['vol_mae_pct']:.2f} %")
    records = read_jsonl(results)
    print("| arm | round | labels | volume MAE % | mean % | ok/n |")
    print("|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda x: (x["arm"], x["round"])):
        print(f"| {r['arm']} | {r['round']} | {r['n_labelled']} | {r['vol_mae_pct']:.2f} | "
              f"{r['vol_mean_pct']:+.2f} | {r['n_ok']}/{r['n_eval']} |")  # fmt: skip
    return records


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

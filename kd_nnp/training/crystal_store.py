"""The training store of the demo and of cross-validation: teacher-pre-relaxed, strained and
rattled frames of experimental crystals (:func:`kd_nnp.data.sources.perturb.make_perturbations`
with the ``frames`` block of ``conf/demo.yaml``), built once and shared by every run on it.

One crystal per task (worker processes, one thread each); each finished crystal is written at
once, so a killed build loses at most the crystals in flight; ``frames.done.json`` records the
crystals and frame settings of a finished store, and a store holding another recipe's frames is
refused rather than mixed. Frames carry their experimental parent's molecule keys
(``info["mol_keys"]``, taken before the teacher's pre-relaxation, which can change a bond graph),
so training can drop the molecules of a test fold (``data.exclude_molecules``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd_nnp.errors import KdNnpError

_WORKER_TEACHER: Any = None


def prerelax_teacher(cfg: Any) -> str:
    """The teacher that pre-relaxes the training crystals' X-ray positions (a config with the
    ``demo`` block of ``conf/demo.yaml``): ``demo.prerelax_teacher``, or ``demo.teacher``
    when that is null. The demo and ``kd-nnp evaluate cv`` build their stores with it."""
    name = cfg.demo.get("prerelax_teacher")
    return str(cfg.demo.teacher if name is None else name)


def _init_worker(teacher: str) -> None:
    """Load the pre-relaxing teacher once per worker (none when ``teacher`` is empty: no
    pre-relaxation steps)."""
    global _WORKER_TEACHER
    if not teacher:
        return
    from kd_nnp.teachers.registry import load_teacher

    _WORKER_TEACHER = load_teacher(teacher)


def _task(item: dict[str, Any]) -> list[Any]:
    from kd_nnp.data.sources.perturb import make_perturbations

    f = item["frames"]
    calc = _WORKER_TEACHER.calculator if (_WORKER_TEACHER and f["prerelax_steps"] > 0) else None
    return make_perturbations(
        [(item["code"], item["atoms"])],
        n_strain=f["n_strain"],
        n_rattle=f["n_rattle"],
        seed=item["seed"],
        volume_range=tuple(f["volume_range"]),
        shear=f["shear"],
        rattle_std=f["rattle_std"],
        prerelax_calc=calc,
        prerelax_steps=f["prerelax_steps"],
        source="demo-perturb",
    )


def build_crystal_store(
    store_dir: Path,
    crystals: list[tuple[str, Any]],
    frames: dict[str, Any],
    *,
    seed: int,
    teacher: str,
    workers: int = 1,
    description: str = "kd-nnp demo: perturbed pyxtal crystals",
) -> Path:
    """Frames of each ``(code, atoms)`` of ``crystals`` in ``store_dir`` (resumable).

    ``frames``: ``n_strain``, ``n_rattle``, ``volume_range``, ``shear``, ``rattle_std``,
    ``prerelax_steps`` (teacher relaxation of the X-ray positions at fixed cell)."""
    from kd_nnp.data.store import FrameStore
    from kd_nnp.utils.parallel import run_tasks

    store_dir = Path(store_dir)
    done = store_dir / "frames.done.json"
    wanted = [c for c, _ in crystals]
    # mol_keys: the frames record their experimental parent's molecules (a store built before
    # recorded the teacher-pre-relaxed ones, whose bond graph can differ): rebuild such a store
    recipe = {"frames": dict(frames), "seed": int(seed), "teacher": str(teacher),
              "mol_keys": "parent"}  # fmt: skip
    if done.exists():
        rec = json.loads(done.read_text())
        if rec.get("crystals") == wanted and rec.get("recipe", recipe) == recipe:
            return store_dir
        if rec.get("recipe", recipe) != recipe:
            raise KdNnpError(
                f"{done}: the store was built with {rec.get('recipe')}, not {recipe}; "
                "use another output folder or delete the store"
            )
    store = FrameStore(store_dir, create=True, description=description)
    have = {fid.split("/")[0] for fid in store.frame_ids()}
    todo = [
        (code, {"code": code, "atoms": atoms, "frames": dict(frames), "seed": int(seed)})
        for code, atoms in crystals
        if code not in have
    ]
    failed = []
    results = run_tasks(
        _task,
        todo,
        n_workers=min(int(workers), len(todo)),
        initializer=_init_worker,
        initargs=(str(teacher) if int(frames["prerelax_steps"]) > 0 else "",),
        desc="frames (teacher pre-relaxation)",
    )
    for res in results if todo else []:
        if res.ok:
            store.add_frames(res.value)
        else:
            failed.append(res.key)
            print(f"      frames of {res.key} failed: {res.error.splitlines()[0]}")
    if failed:
        raise RuntimeError(f"building frames failed for {failed}; rerun to retry them")
    done.write_text(json.dumps({"crystals": wanted, "recipe": recipe}))
    return store_dir

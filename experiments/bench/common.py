"""Shared helpers of the benchmark scripts (``experiments/bench/*.py``).

- frames: real organic crystals of pyxtal's shipped ``test.db``, perturbed with kd_nnp's own
  :func:`kd_nnp.data.sources.perturb.make_perturbations` (molecule-rigid strains, rattled
  copies), so every benchmark and the tests use the library's frame builder, not a copy;
- children: every measurement that reports memory runs in its own process
  (:func:`run_child` / :func:`run_measured`); peak RSS is ``VmHWM`` of the child itself
  (:func:`peak_rss_mb`) or, for commands we do not control, ``ru_maxrss`` of ``wait4`` on
  that one child (the largest of it and its own waited-for children);
- the machine: CPU model, cores, RAM, load average.

This module imports neither torch nor chgnet at import time, so the orchestrating parent
(``run_all.py``) stays small and its children's peaks are their own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULT_PREFIX = "RESULT "
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ----------------------------------------------------------------------------- machine
def one_thread_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: one BLAS/OpenMP/torch thread, offline W&B, no tqdm noise."""
    env = dict(os.environ)
    for var in THREAD_ENV:
        env[var] = "1"
    env["KD_NNP_THREADS"] = "1"
    env.setdefault("WANDB_MODE", "offline")
    env["HYDRA_FULL_ERROR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover
        return (float("nan"),) * 3


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, RAM, kernel, Python; for the benchmark record."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 1024**2
                break
    except OSError:
        pass
    from kd_nnp.utils.provenance import git_state

    state = git_state(REPO, pathspec="kd_nnp", untracked=True)
    commit, dirty = (state[0][:7], state[1]) if state else ("unknown", [])
    return {
        "git_commit": commit,
        "kd_nnp_uncommitted": dirty,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1),
        "platform": sys.platform,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "load_avg": [round(x, 2) for x in load_average()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


_BURN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range({n}): x += i * i\nprint(time.perf_counter() - t)"


def parallel_capacity(n_iter: int = 10_000_000) -> dict[str, Any]:
    """How much a second CPU-bound process of ours gains on this machine right now.

    One pure-Python loop alone, then two at once: ``speedup = 2 t_one / max(t_two)`` is 2.0
    with two free cores and ~1.0 when other users' processes take the rest (on a shared
    machine a second process may get no extra CPU at all)."""

    def start() -> subprocess.Popen:
        code = _BURN.format(n=int(n_iter))
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    p = start()
    one = float(p.communicate()[0])
    procs = [start(), start()]
    two = [float(q.communicate()[0]) for q in procs]
    return {"one_s": one, "two_s": two, "speedup": 2 * one / max(two)}


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (``VmHWM``).

    getrusage's ru_maxrss is used only where /proc is missing: Linux carries it over from
    the parent through fork + exec, which reported the parent's peak for small children."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def rss_mb() -> float:
    """Current resident memory of this process in MB (``VmRSS``)."""
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def rss_parts_mb() -> dict[str, float]:
    """Resident memory split: private (``RssAnon``) and file-backed (``RssFile``, e.g.
    libraries and memory-mapped feature files: clean pages the kernel can drop)."""
    return {
        "anon": (_status_kb("RssAnon") or 0) / 1024,
        "file": (_status_kb("RssFile") or 0) / 1024,
        "total": rss_mb(),
    }


# ----------------------------------------------------------------------------- frames
def perturbed_frames(
    codes: Sequence[str],
    *,
    n_strain: int = 1,
    n_rattle: int = 1,
    seed: int = 0,
    include_parent: bool = False,
) -> list[Any]:
    """Frames of pyxtal's ``test.db`` crystals ``codes``, perturbed by kd_nnp.

    ``n_strain`` molecule-rigid strained copies (-8 % .. +20 % in volume) and ``n_rattle``
    strained + rattled (0.04 A) copies per crystal, seeded: :func:`make_perturbations`.
    """
    from kd_nnp.data.sources.perturb import make_perturbations
    from kd_nnp.data.sources.pyxtal_db import pyxtal_frames

    parents = pyxtal_frames("test", codes=list(codes))
    return make_perturbations(
        parents, n_strain=n_strain, n_rattle=n_rattle, seed=seed, include_parent=include_parent
    )


def codes_by_size(min_atoms: int, max_atoms: int, n: int) -> list[str]:
    """``n`` test.db crystals (that pass kd_nnp's sanity check) spread over a size range."""
    from kd_nnp.data.sources.pyxtal_db import pyxtal_frames

    rows = sorted(
        (len(f.atoms), f.group_id)
        for f in pyxtal_frames("test")
        if min_atoms <= len(f.atoms) <= max_atoms
    )
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} test.db crystals have {min_atoms}-{max_atoms} atoms")
    if n == 1:
        return [rows[0][1]]
    step = (len(rows) - 1) / (n - 1)
    return [rows[round(i * step)][1] for i in range(n)]


def load_chgnet() -> Any:
    """Pretrained CHGNet 0.3.0, float32, CPU, with only ``model.mlp`` trainable."""
    from kd_nnp.training.student import load_student

    return load_student("0.3.0", freeze="mlp")


# ----------------------------------------------------------------------------- children
def child_main(children: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """If this process was started as ``script --child NAME --config FILE``, run the child,
    print its result as the last line ``RESULT {json}`` and return True."""
    if "--child" not in sys.argv:
        return False
    name = sys.argv[sys.argv.index("--child") + 1]
    cfg = json.loads(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
    from kd_nnp.utils.threads import set_threads

    set_threads(int(cfg.get("threads", 1)))
    out = children[name](cfg)
    out.setdefault("peak_rss_mb", peak_rss_mb())
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(out, default=float), flush=True)
    return True


class ChildError(RuntimeError):
    pass


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    log: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``cmd``; return rc, wall seconds, ``ru_maxrss`` of that child (MB) and its output.

    Output goes to ``log`` (a file; default a temporary one) so that no pipe can block;
    the child is reaped with ``os.wait4`` so its rusage is its own, not that of earlier
    children. On timeout the child's process group is killed (rc -9)."""
    import tempfile

    own_log = log is None
    if own_log:
        fd, log = tempfile.mkstemp(prefix="kd_bench_", suffix=".log")
        os.close(fd)
    log = Path(log)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env or one_thread_env(), stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, _kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if own_log:
        log.unlink(missing_ok=True)
    return {
        "rc": proc.returncode,
        "timed_out": timed_out.is_set(),
        "wall_s": wall,
        "maxrss_mb": usage.ru_maxrss / 1024,
        "output": text,
    }


def run_child(
    script: str | Path,
    name: str,
    cfg: dict[str, Any],
    workdir: Path,
    *,
    timeout: float | None = None,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``script --child name`` with ``cfg`` in a fresh process; return its RESULT dict
    (plus ``wall_s`` of the whole process and ``wait4_maxrss_mb``). Raises :class:`ChildError`
    with the tail of its output if it failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{Path(script).stem}.{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    log = workdir / f"{Path(script).stem}.{name}.log"
    res = run_measured(
        [sys.executable, str(script), "--child", name, "--config", str(cfg_path)],
        cwd=workdir, env=one_thread_env(env_extra), timeout=timeout, log=log,
    )  # fmt: skip
    lines = [x for x in res["output"].splitlines() if x.startswith(RESULT_PREFIX)]
    if res["rc"] != 0 or not lines:
        why = "timed out" if res["timed_out"] else f"exit code {res['rc']}"
        tail = "\n".join(res["output"].strip().splitlines()[-25:])
        raise ChildError(f"{Path(script).name} --child {name}: {why} (log {log})\n{tail}")
    out = json.loads(lines[-1][len(RESULT_PREFIX) :])
    out["process_wall_s"] = res["wall_s"]
    out["wait4_maxrss_mb"] = res["maxrss_mb"]
    return out


def error_summary(exc: BaseException) -> str:
    """One line for the table; the JSON keeps the full text."""
    text = str(exc).strip().splitlines()
    last = [x for x in text if x.strip()]
    head = f"{type(exc).__name__}: {last[0] if last else ''}"
    tail = last[-1] if len(last) > 1 else ""
    return (head + (f" ... {tail}" if tail and tail != head else ""))[:300]


def format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-6000:]


# ----------------------------------------------------------------------------- labelled store
SOFT_LABEL_SET = "bench_teacher"
# per-element zero of the stand-in soft labels (eV/atom): a teacher with another reference
SOFT_ZERO = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0, 9: -2700.0, 16: -10800.0, 17: -12500.0}


def child_prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Write a frames store of perturbed test.db crystals with stand-in labels.

    Hard labels: the pretrained CHGNet's energies/forces/stress plus Gaussian noise (0.02
    eV/atom, 0.1 eV/A, 0.05 GPa); soft labels (label set ``bench_teacher``): CHGNet with other
    noise plus a per-element energy zero (so the reference alignment has work to do).
    Timings do not depend on the label values; only their existence matters.
    """
    import numpy as np
    from pymatgen.io.ase import AseAtomsAdaptor

    from kd_nnp.data.store import FrameStore, Labels

    frames = perturbed_frames(
        cfg["codes"], n_strain=cfg["n_strain"], n_rattle=cfg["n_rattle"], seed=cfg["seed"]
    )
    model = load_chgnet().eval()
    rng = np.random.default_rng(cfg["seed"])
    soft = []
    for fr in frames:
        graph = model.graph_converter(AseAtomsAdaptor.get_structure(fr.atoms))
        pred = model([graph], task="efs")
        n = len(fr.atoms)
        e = float(pred["e"][0]) * n
        f = pred["f"][0].detach().numpy().astype(float)
        s = pred["s"][0].detach().numpy().astype(float) / 160.21766208  # GPa -> eV/A^3 (ASE)

        def noisy() -> Labels:
            return Labels(
                e + float(rng.normal(scale=0.02)) * n,  # noqa: B023 - used in this iteration
                f + rng.normal(scale=0.1, size=f.shape),  # noqa: B023
                s + rng.normal(scale=0.05 / 160.21766208, size=(3, 3)),  # noqa: B023
            )

        fr.hard = noisy()
        lab = noisy()
        lab.energy += sum(SOFT_ZERO.get(int(z), -1000.0) for z in fr.atoms.numbers)
        soft.append((fr, lab, None, 0.0))
    store = FrameStore(cfg["store"], create=True, description="kd_nnp benchmark frames")
    store.add_frames(frames)
    store.labels(SOFT_LABEL_SET, create=True).write(soft)
    return {
        "frames": len(frames),
        "n_atoms": [len(f.atoms) for f in frames],
        "frame_ids": [f.frame_id for f in frames],
    }


def prepare_store(
    workdir: Path, codes: Sequence[str], n_strain: int, n_rattle: int, seed: int = 0
) -> tuple[Path, dict[str, Any]]:
    """The labelled store of these settings under ``workdir`` (built once, in a child)."""
    tag = f"{'-'.join(codes)}_s{n_strain}_r{n_rattle}_seed{seed}"
    store = workdir / "stores" / tag
    info_file = store / "bench_info.json"
    if info_file.is_file():
        return store, json.loads(info_file.read_text())
    if store.exists():  # a half-written store of a killed run
        import shutil

        shutil.rmtree(store)
    cfg = {"codes": list(codes), "n_strain": n_strain, "n_rattle": n_rattle, "seed": seed,
           "store": str(store)}  # fmt: skip
    info = run_child(Path(__file__), "prepare", cfg, workdir / "logs", timeout=900)
    info_file.write_text(json.dumps(info))
    return store, info


if __name__ == "__main__":
    child_main({"prepare": child_prepare})


def table_rows(section: str) -> tuple[list[dict[str, Any]], Callable[..., None]]:
    """``(rows, row)``: ``row(what, value, compare="", ok=None)`` appends one table row of
    ``section`` to ``rows`` (``ok``: True met, False missed/failed, None informative)."""
    out: list[dict[str, Any]] = []

    def row(what: str, value: str, compare: str = "", ok: bool | None = None) -> None:
        out.append({"section": section, "what": what, "value": value, "compare": compare,
                    "ok": ok})  # fmt: skip

    return out, row

"""Batched relaxation backend (``RelaxSettings.backend = "batched"``): the crystals of one
CHGNet-based calculator (``chgnet``, ``student:PATH``) are relaxed together, one CHGNet forward
per optimizer step for all of them, on the CPU or a GPU.

Each crystal still runs the unchanged per-crystal protocol
(:func:`kd_nnp.evaluation.protocol.relax_structure`: LBFGS on a ``FrechetCellFilter``, the
residual-stress rounds, the volume guard) in its own thread, with a calculator that does not
compute: it hands its structure to a :class:`BatchedCHGNet` and waits. When every crystal in
flight waits, the batcher evaluates them all in one forward (:meth:`BatchedCHGNet.evaluate`)
and hands each its energy, forces and stress back. So every crystal follows the same LBFGS
trajectory as the ase backend up to float differences of the batched forward, converged
crystals leave the batch at once and the next crystal takes the free place (at most
``batch_size`` in flight), and the records are those of the ase backend, key for key.
Neighbour lists (CHGNet's graphs) are built again at every step, as in the ase backend.

Only CHGNet-based specs can be batched: any other spec with ``backend=batched`` is a
:class:`~kd_nnp.errors.KdNnpError` (never a silent fall-back to the ase backend).
"""

from __future__ import annotations

import copy
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from kd_nnp.errors import KdNnpError
from kd_nnp.teachers.calculators import InferenceCHGNetCalculator, chgnet_results
from kd_nnp.utils.parallel import TaskResult

BATCHABLE = "chgnet, student:PATH"


def check_batchable(spec: str) -> None:
    """A :class:`KdNnpError` unless ``spec`` is a CHGNet-based calculator spec."""
    kind, _, rest = str(spec).partition(":")
    if (kind == "chgnet" and not rest) or (kind == "student" and rest):
        return
    raise KdNnpError(
        f"relaxation backend 'batched' batches CHGNet models only ({BATCHABLE}), not "
        f"{spec!r}: relax it with backend=ase"
    )


class BatchedCHGNet:
    """Energy, forces and stress of many structures in one CHGNet forward.

    The same computation as :class:`~kd_nnp.teachers.calculators.InferenceCHGNetCalculator`
    (energy once, forces and strain derivative from one first-order autograd call; ASE units
    and sign: eV, eV/A, eV/A^3 with positive = tensile), for a list of structures."""

    def __init__(self, model: Any, device: str = "cpu") -> None:
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KdNnpError(f"relaxation device={device!r}: torch sees no CUDA device here")
        model = copy.deepcopy(model) if device != "cpu" else model
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.graph_converter.set_isolated_atom_response("ignore")
        self.device = device

    def graph(self, atoms: Atoms) -> Any:
        """CHGNet's crystal graph of ``atoms`` (neighbour lists built now, on the CPU)."""
        from pymatgen.io.ase import AseAtomsAdaptor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.model.graph_converter(AseAtomsAdaptor.get_structure(atoms))

    def evaluate(self, graphs: Sequence[Any]) -> list[dict[str, Any]]:
        """ASE results (``energy``, ``free_energy``, ``forces``, ``stress`` Voigt) per graph
        (:func:`~kd_nnp.teachers.calculators.chgnet_results`, the inference calculator's own
        computation)."""
        return chgnet_results(self.model, graphs, self.device)


class _Batcher:
    """Collects the requests of the relaxation threads; :meth:`serve` answers them in batches
    once every crystal in flight waits."""

    def __init__(self, engine: BatchedCHGNet) -> None:
        self.engine = engine
        self.cond = threading.Condition()
        self.active = 0  # crystals in flight (may still ask for a force)
        self.pending: dict[int, Any] = {}  # request id -> graph
        self.answers: dict[int, Any] = {}
        self.finished: list[TaskResult] = []
        self._next = 0
        self.forwards = 0
        self.forward_s = 0.0  # seconds in the batched forwards (graphs are built in threads)
        self.batch_sizes: list[int] = []
        self.closed = False  # the consumer stopped: every request is refused

    def enter(self) -> None:
        with self.cond:
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def request(self, atoms: Atoms) -> dict[str, Any]:
        graph = self.engine.graph(atoms)  # in the crystal's thread
        with self.cond:
            if self.closed:
                raise RuntimeError("batched relaxation stopped")
            rid = self._next
            self._next += 1
            self.pending[rid] = graph
            self.cond.notify_all()
            self.cond.wait_for(lambda: rid in self.answers or self.closed)
            if rid not in self.answers:
                raise RuntimeError("batched relaxation stopped")
            ans = self.answers.pop(rid)
        if isinstance(ans, BaseException):
            raise ans
        return ans

    def done(self, res: TaskResult) -> None:
        with self.cond:
            self.finished.append(res)
            self.cond.notify_all()

    def close(self) -> None:
        """Refuse every waiting and later request (the consumer stopped early)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def serve(self, total: int) -> Iterator[TaskResult]:
        """Answer batches until ``total`` tasks finished; yield each task's result."""
        yielded = 0
        while yielded < total:
            with self.cond:
                self.cond.wait_for(
                    lambda: (
                        bool(self.finished)
                        or (bool(self.pending) and len(self.pending) >= self.active)
                    )
                )
                ready, self.finished = self.finished, []
                batch: dict[int, Any] = {}
                if self.pending and len(self.pending) >= self.active:
                    batch, self.pending = self.pending, {}
            for res in ready:
                yielded += 1
                yield res
            if batch:
                answers = self._answer(batch)
                with self.cond:
                    self.answers.update(answers)
                    self.cond.notify_all()

    def _answer(self, batch: dict[int, Any]) -> dict[int, Any]:
        ids = list(batch)
        self.forwards += 1
        self.batch_sizes.append(len(ids))
        t0 = time.perf_counter()
        try:
            return dict(zip(ids, self.engine.evaluate([batch[i] for i in ids]), strict=True))
        except Exception:  # noqa: BLE001 - find the structure that fails, one at a time
            out: dict[int, Any] = {}
            for i in ids:
                try:
                    out[i] = self.engine.evaluate([batch[i]])[0]
                except Exception as exc:  # noqa: BLE001 - that crystal's error record
                    out[i] = exc
            return out
        finally:
            self.forward_s += time.perf_counter() - t0


class _BatchSlot(Calculator):
    """The calculator of one crystal in flight: computes nothing, asks the batcher."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, batcher: _Batcher) -> None:
        super().__init__()
        self.batcher = batcher
        self.open = True

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        if not self.open:
            raise RuntimeError("batched relaxation: a calculation after the crystal left")
        self.results = dict(self.batcher.request(self.atoms))

    def close(self) -> None:
        """The crystal is relaxed: it leaves the batch (once)."""
        if self.open:
            self.open = False
            self.batcher.leave()


def run_batched(
    task: Callable[[dict[str, Any], Calculator, Callable[[], None]], Any],
    jobs: Sequence[tuple[Any, dict[str, Any]]],
    model: Any,
    *,
    batch_size: int,
    device: str = "cpu",
    stats: dict[str, Any] | None = None,
) -> Iterator[TaskResult]:
    """Run ``task(item, calc, relaxed)`` for ``(key, item)`` jobs of one CHGNet ``model``,
    at most ``batch_size`` at a time, their force calls batched; yield a
    :class:`~kd_nnp.utils.parallel.TaskResult` per job as it finishes (an exception becomes
    that job's error, as in :func:`~kd_nnp.utils.parallel.run_tasks`). ``task`` calls
    ``relaxed()`` once it needs no more forces (then it leaves the batch). ``stats`` (a dict)
    accumulates ``crystals``, ``forwards``, ``forward_s`` (seconds in the forwards), the
    ``batch_sizes`` and their ``mean_batch``."""
    if batch_size < 1:
        raise KdNnpError(f"batch_size={batch_size} must be >= 1")
    batcher = _Batcher(BatchedCHGNet(model, device))

    def one(key: Any, item: dict[str, Any]) -> None:
        calc = _BatchSlot(batcher)
        batcher.enter()
        t0 = time.perf_counter()
        try:
            res = TaskResult(key, value=task(item, calc, calc.close))
        except Exception as exc:  # noqa: BLE001 - reported per job
            msg = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
            res = TaskResult(key, error=msg)
        finally:
            calc.close()
        res.seconds = time.perf_counter() - t0
        batcher.done(res)

    pool = ThreadPoolExecutor(max_workers=batch_size, thread_name_prefix="relax")
    futures = [pool.submit(one, key, item) for key, item in jobs]
    try:
        yield from batcher.serve(len(jobs))
        for f in futures:
            f.result()  # one() catches everything; a failure here is a defect, raised
    finally:  # also when the consumer stops early: no thread is left waiting
        batcher.close()
        pool.shutdown(wait=True, cancel_futures=True)
    if stats is not None:
        stats["crystals"] = stats.get("crystals", 0) + len(jobs)
        stats["forwards"] = stats.get("forwards", 0) + batcher.forwards
        stats["forward_s"] = stats.get("forward_s", 0.0) + batcher.forward_s
        stats["batch_sizes"] = stats.get("batch_sizes", []) + batcher.batch_sizes
        sizes = stats["batch_sizes"]
        stats["mean_batch"] = float(np.mean(sizes)) if sizes else 0.0


def chgnet_model(spec: str, fingerprint: str | None = None) -> Any:
    """The CHGNet model of a batchable spec (the calculator built once per process)."""
    from kd_nnp.evaluation.runner import get_calc

    check_batchable(spec)
    calc = get_calc(spec, fingerprint)
    if not isinstance(calc, InferenceCHGNetCalculator):  # pragma: no cover - check_batchable
        raise KdNnpError(f"calculator spec {spec!r} is not a CHGNet model")
    return calc.model

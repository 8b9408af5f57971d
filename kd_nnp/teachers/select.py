"""Active selection of what the teacher labels (``kd-nnp label ... select.n=N``).

The store's frames are the pool. ``select.n=N`` is a label budget: after the run the label set
holds N of the store's frames (labelled or failed: the teacher was paid for both). The frames
still missing are picked from the frames the label set does not hold yet:

- ``select.by=random``: uniformly at random, seeded by ``select.seed`` and the round number;
- ``select.by=committee select.committee=PATH``: the highest committee disagreement, ``PATH``
  being the committee file (``student.pt`` of a ``kd-nnp train ... committee.size=K`` run on
  the frames labelled so far), scored by
  :func:`~kd_nnp.teachers.committee.committee_disagreement` (one backbone pass per frame) on
  ``select.metric`` (default the energy std per atom, eV/atom); ties keep the store order;
  ``select.max_per_group=M`` takes at most M frames of one crystal (``group_id``) per round
  (the plain top-N of a small committee tends to take one crystal's frames only).

Every round is recorded, before its first label is computed, as one line of
``STORE/labels/<name>.select.jsonl``: the request (budget, method, committee file and its
sha256, metric, seed), the frames held before (count and hash), the picks and their scores.
A killed round resumes with the recorded picks (rescoring a pool that lost the frames already
labelled would pick others); a rerun with other inputs while a round is unfinished, or after
the label set changed under an unfinished round, is refused. A finished round's budget is
reached, so rerunning its command does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_nnp.data.store import FrameStore, LabelSet
from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.utils.jsonl import append_jsonl, read_jsonl
from kd_nnp.utils.provenance import stable_hash

log = logging.getLogger(__name__)

METHODS = ("random", "committee")
#: the keys of committee_disagreement's records
METRICS = ("energy_std_per_atom", "forces_std_max", "forces_std_mean", "stress_std_max")


class SelectionError(KdNnpError, RuntimeError):
    """A selection round cannot be made or resumed with these inputs."""


@dataclass(frozen=True)
class SelectSettings:
    """``select`` block of ``conf/label.yaml``."""

    n: int | None = field(
        default=None,
        metadata={
            "help": "label budget: after this run the label set holds N of the store's frames "
            "(labelled or failed); null = label every frame (no selection)"
        },
    )
    by: str = field(default="random", metadata={"help": "random | committee"})
    committee: str | None = field(
        default=None,
        metadata={"help": "committee file (student.pt of a committee.size>=2 run), by=committee"},
    )
    metric: str = field(
        default="energy_std_per_atom",
        metadata={"help": f"disagreement ranked by by=committee: {' | '.join(METRICS)}"},
    )
    seed: int = field(default=0, metadata={"help": "seed of by=random (with the round number)"})
    max_per_group: int | None = field(
        default=None,
        metadata={
            "help": "by=committee: at most this many picks per group (crystal) in one round, "
            "the next-ranked frames of other groups instead; null = no limit"
        },
    )

    def __post_init__(self) -> None:
        if self.n is not None and int(self.n) < 1:
            raise SettingsError(f"select.n must be >= 1 (a label budget), got {self.n}")
        if self.by not in METHODS:
            raise SettingsError(f"select.by must be one of {METHODS}, got {self.by!r}")
        if self.by == "committee" and not self.committee:
            raise SettingsError("select.by=committee needs select.committee=PATH (student.pt)")
        if self.by == "random" and self.committee:
            raise SettingsError("select.committee is read only with select.by=committee")
        if self.max_per_group is not None and int(self.max_per_group) < 1:
            raise SettingsError(f"select.max_per_group must be >= 1, got {self.max_per_group}")
        if self.metric not in METRICS:
            raise SettingsError(f"select.metric must be one of {METRICS}, got {self.metric!r}")

    @property
    def active(self) -> bool:
        return self.n is not None


def select_settings(cfg: Any) -> SelectSettings:
    from kd_nnp.utils.settings import from_mapping

    return from_mapping(SelectSettings, cfg.get("select"), where="select")


def journal_path(labels: LabelSet) -> Path:
    """``labels/<name>.select.jsonl``: one line per selection round of label set ``labels``."""
    return labels.path.with_name(f"{labels.name}.select.jsonl")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def committee_scores(path: str | Path, store: FrameStore, frame_ids: list[str]) -> list[dict]:
    """``committee_disagreement`` of the committee file ``path`` on ``frame_ids`` of ``store``
    (one backbone pass per frame)."""
    from kd_nnp.teachers.base import StudentFileError
    from kd_nnp.teachers.committee import CommitteeCalculator, committee_disagreement

    if not Path(path).is_file():
        raise StudentFileError(f"select.committee: no committee file {path}")
    calc = CommitteeCalculator.from_file(path)
    out = []
    t0 = time.perf_counter()
    for i, frame in enumerate(store.iter_frames(frame_ids)):
        out.extend(committee_disagreement(calc, [frame.atoms]))
        if (i + 1) % 100 == 0:
            log.info("select: scored %d/%d pool frames (%.0f s)", i + 1, len(frame_ids),
                     time.perf_counter() - t0)  # fmt: skip
    return out


def _request(settings: SelectSettings) -> dict[str, Any]:
    req: dict[str, Any] = {"budget": int(settings.n or 0), "by": settings.by, "seed": settings.seed}
    if settings.by == "committee":
        assert settings.committee is not None
        if not Path(settings.committee).is_file():
            raise SelectionError(f"select.committee: no committee file {settings.committee}")
        req.update(
            committee=str(settings.committee),
            committee_sha256=file_sha256(settings.committee),
            metric=settings.metric,
            max_per_group=settings.max_per_group,
        )
    return req


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("budget", "by", "seed", "committee_sha256", "metric", "max_per_group")
    return all(a.get(k) == b.get(k) for k in keys)


def _describe(r: dict[str, Any]) -> str:
    s = f"select.n={r['budget']} select.by={r['by']}"
    if r["by"] == "committee":
        s += f" select.committee={r['committee']} select.metric={r['metric']}"
        if r.get("max_per_group") is not None:
            s += f" select.max_per_group={r['max_per_group']}"
    return s + f" select.seed={r['seed']}"


def _capped(
    ranked: np.ndarray, store: FrameStore, pool: list[str], cap: int | None, k: int
) -> list[int]:
    """The first ``k`` of ``ranked`` (indices into ``pool``) taking at most ``cap`` frames of
    one group (the frames' ``group_id``); fewer than ``k`` groups' worth: the cap is lifted
    for the rest, in rank order."""
    if cap is None:
        return [int(i) for i in ranked[:k]]
    group = {fr.frame_id: fr.group_id for fr in store.iter_frames(pool)}
    taken: list[int] = []
    count: dict[str, int] = {}
    for i in ranked:
        g = group[pool[i]]
        if count.get(g, 0) < cap:
            taken.append(int(i))
            count[g] = count.get(g, 0) + 1
            if len(taken) == k:
                return taken
    chosen = set(taken)
    return taken + [int(i) for i in ranked if int(i) not in chosen][: k - len(taken)]


def select_todo(
    store: FrameStore, labels: LabelSet, settings: SelectSettings, status: dict[str, str]
) -> list[str]:
    """The frames this run labels for selection ``settings`` (see the module doc); ``status``
    is the label set's :meth:`~kd_nnp.data.store.LabelSet.status`. Records a new round in the
    journal before returning its picks; returns the unlabelled picks of an unfinished round."""
    ids = store.frame_ids()
    held = sorted(i for i in ids if i in status)
    path = journal_path(labels)
    rounds = read_jsonl(path)
    req = _request(settings)
    if rounds:
        last = rounds[-1]
        missing = [f for f in last["picks"] if f not in status]
        if missing:
            if not _same(last, req):
                raise SelectionError(
                    f"{path}: round {last['round']} ({_describe(last)}) is unfinished "
                    f"({len(missing)} of {len(last['picks'])} picks unlabelled); rerun with "
                    "those settings to finish it before a new round"
                )
            before = sorted(set(held) - set(last["picks"]))
            if stable_hash(before) != last["held_before_hash"]:
                raise SelectionError(
                    f"{path}: the label set {labels.path} changed since round {last['round']} "
                    f"picked its frames ({len(before)} frames held besides its picks, "
                    f"{last['n_held_before']} then): not the inputs it was picked from"
                )
            unknown = [f for f in missing if f not in store]
            if unknown:
                raise SelectionError(
                    f"{path}: round {last['round']} picked frame {unknown[0]!r}, which "
                    f"{store.frames_path} does not hold"
                )
            log.info("select: resuming round %d, %d picks left", last["round"], len(missing))
            return missing
    need = req["budget"] - len(held)
    if need <= 0:
        log.info(
            "select: label set %r holds %d frames >= budget %d; nothing to select",
            labels.name, len(held), req["budget"],
        )  # fmt: skip
        return []
    pool = [i for i in ids if i not in status]
    if not pool:
        log.info("select: every frame of %s is held by label set %r", store.root, labels.name)
        return []
    k = min(need, len(pool))
    t0 = time.perf_counter()
    scores: list[float] | None = None
    if settings.by == "random":
        rng = np.random.default_rng([int(settings.seed), len(rounds)])
        picks = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    else:
        recs = committee_scores(req["committee"], store, pool)
        values = np.array([r[settings.metric] for r in recs], dtype=float)
        if not np.all(np.isfinite(values)):
            bad = pool[int(np.flatnonzero(~np.isfinite(values))[0])]
            raise SelectionError(
                f"select: committee {req['committee']} gives a non-finite {settings.metric} "
                f"on frame {bad!r} of {store.root}"
            )
        order = _capped(np.argsort(-values, kind="stable"), store, pool, settings.max_per_group, k)
        picks = [pool[i] for i in order]
        scores = [float(values[i]) for i in order]
        req["pool_scores"] = {
            "n": len(values), "mean": float(values.mean()), "median": float(np.median(values)),
            "max": float(values.max()), "min": float(values.min()),
        }  # fmt: skip
    record = {
        "round": len(rounds),
        **req,
        "n_held_before": len(held),
        "held_before_hash": stable_hash(held),
        "n_pool": len(pool),
        "picks": picks,
        **({"scores": scores} if scores is not None else {}),
        "select_s": round(time.perf_counter() - t0, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    append_jsonl(path, record)
    log.info(
        "select: round %d picked %d of %d pool frames (%s) -> %s",
        record["round"], len(picks), len(pool), settings.by, path,
    )  # fmt: skip
    return picks

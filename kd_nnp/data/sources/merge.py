"""One store from several: shards of a generated corpus, a corpus plus the demo's frames.

``kd-nnp data merge --out STORE SRC [SRC ...]`` copies every frame of every source store and
every label set they hold into ``STORE``. Nothing is recomputed and nothing is silently
dropped:

- Frame ids must be unique across sources: a frame id found in two sources is an error naming
  both stores, unless both hold the same frame (same atoms, cell, group id and hard labels, as
  the same crystal copied twice would), which is kept once.
- A label set (``labels/<name>.db``) that several sources hold must have been made by the same
  teacher with the same settings (the ``hash`` of its provenance): otherwise the merge stops,
  naming the two stores and hashes, since one label set mixing two teachers' energy zeros would
  train a student on nonsense. Failed frames stay failed (their error is copied) unless another
  source labelled them; a frame labelled in two sources must carry the same labels (kept once),
  else the merge stops naming both files (:func:`copy_labels`, shared with the merge of label
  shards, ``kd-nnp label ... merge_shards=true``).
- Resumable and idempotent: frames and labels already in ``STORE`` are skipped, so a killed
  merge is finished by running it again. ``STORE/merge.json`` records the sources (resolved
  paths); a rerun with other sources is refused (write to a new ``--out``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_nnp.data.store import Frame, FrameStore, Labels, LabelSet, StoreError, check_recipe

log = logging.getLogger(__name__)

RECIPE_FILE = "merge.json"


@dataclass
class MergeReport:
    frames_written: int = 0
    frames_same: int = 0
    labels_written: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        labels = ", ".join(f"{k}: {v}" for k, v in sorted(self.labels_written.items())) or "none"
        return (
            f"{self.frames_written} frames written ({self.frames_same} duplicates kept once) "
            f"from {len(self.per_source)} stores; labels written: {labels}"
        )


def _same_frame(a: Frame, b: Frame) -> bool:
    x, y = a.atoms, b.atoms
    if len(x) != len(y) or (x.numbers != y.numbers).any() or str(a.group_id) != str(b.group_id):
        return False
    if not (np.allclose(x.positions, y.positions) and np.allclose(x.cell.array, y.cell.array)):
        return False
    ha, hb = a.hard or Labels(), b.hard or Labels()
    for key in ("energy", "forces", "stress"):
        va, vb = getattr(ha, key), getattr(hb, key)
        if (va is None) != (vb is None) or (va is not None and not np.allclose(va, vb)):
            return False
    return True


def merge_stores(out: str | Path, sources: Sequence[str | Path]) -> MergeReport:
    """Merge the frames and label sets of ``sources`` into the store ``out`` (see module doc)."""
    if not sources:
        raise StoreError("merge needs at least one source store")
    srcs = [FrameStore(s) for s in sources]  # each must be a store: StoreError names it
    roots = [str(s.root.resolve()) for s in srcs]
    if len(set(roots)) != len(roots):
        raise StoreError(f"a source store is given twice: {roots}")
    out_root = Path(out).resolve()
    if str(out_root) in roots:
        raise StoreError(f"--out {out_root} is also a source")
    dest = FrameStore(out_root, create=True, description="merged: " + ", ".join(roots))
    check_recipe(dest, RECIPE_FILE, {"sources": roots}, "merge")
    report = MergeReport()

    # 1. label-set provenance must agree before anything is written
    sets: dict[str, list[tuple[str, LabelSet]]] = {}
    for src in srcs:
        _refuse_unmerged_shards(src)
        for name in src.label_names():
            sets.setdefault(name, []).append((str(src.root), src.labels(name)))
    provenance = {name: same_teacher(name, found) for name, found in sets.items()}

    # 2. frames: ids unique across sources (identical duplicates kept once)
    owner: dict[str, str] = {}
    for src in srcs:
        for fid in src.frame_ids():
            if fid in owner and owner[fid] != str(src.root):
                other = FrameStore(owner[fid]).get(fid)
                if not _same_frame(other, src.get(fid)):
                    raise StoreError(
                        f"frame {fid!r} is in {owner[fid]} and in {src.root} with other "
                        "content; frame ids must be unique across the merged stores"
                    )
                report.frames_same += 1
            else:
                owner.setdefault(fid, str(src.root))
    for src in srcs:
        mine = [fid for fid in src.frame_ids() if owner[fid] == str(src.root)]
        n = dest.add_frames(src.iter_frames(mine))
        report.frames_written += n
        report.per_source[str(src.root)] = len(mine)
        log.info("merge: %d of %d frames of %s written", n, len(mine), src.root)

    # 3. labels: copied as they are (ok rows and failures), skipping what is there
    for name, prov in sorted(provenance.items()):
        target = dest.labels(name, create=True)
        with target.writer_lock():
            target.set_provenance(prov)
            report.labels_written[name] = copy_labels(
                target, [(src, src.labels(name)) for src in srcs if name in src.label_names()]
            )
    return report


def _refuse_unmerged_shards(src: FrameStore) -> None:
    """Label shards (``labels/shards/<name>/``) are not label sets: a source whose shards hold
    labels its label set lacks would lose them in the merge, so it is refused."""
    folder = src.root / "labels" / "shards"
    for d in sorted(p for p in folder.glob("*") if p.is_dir()):
        name = d.name
        have = src.labels(name).status() if name in src.label_names() else {}
        for ls in src.label_shards(name).values():
            if any(f not in have for f in ls.status()):
                raise StoreError(
                    f"{src.root}: label shard {ls.path} holds labels that label set {name!r} "
                    f"lacks; merge the shards first (`kd-nnp label store={src.root} "
                    f"teacher=... name={name} merge_shards=true`)"
                )


def same_teacher(name: str, sets: Sequence[tuple[str, LabelSet]]) -> dict[str, Any]:
    """The provenance of label sets ``sets`` (``(where, set)`` pairs: a store, a shard file)
    that must hold labels of one teacher with one settings hash; otherwise :class:`StoreError`
    naming the two places and hashes (one label set mixing two teachers' energy zeros would
    train a student on nonsense)."""
    first_where, first = "", {}
    for where, ls in sets:
        prov = ls.provenance
        if not first_where:
            first_where, first = where, prov
        elif first.get("hash") != prov.get("hash"):
            raise StoreError(
                f"label set {name!r} differs between {first_where} (hash {first.get('hash')}) "
                f"and {where} (hash {prov.get('hash')}): made by other teachers or "
                "settings; relabel one of them or give it another label-set name"
            )
    return first


def _same_labels(a: Labels, b: Labels) -> bool:
    for key in ("energy", "forces", "stress"):
        va, vb = getattr(a, key), getattr(b, key)
        if (va is None) != (vb is None):
            return False
        if va is not None and not np.allclose(va, vb, rtol=1e-7, atol=1e-9):
            return False
    return True


def copy_labels(
    target: LabelSet, sources: Sequence[tuple[FrameStore, LabelSet]], *, batch: int = 1000
) -> int:
    """Copy the rows of label sets ``sources`` (each with the store holding its frames) into
    ``target``; the caller holds ``target``'s writer lock and has checked the teachers
    (:func:`same_teacher`). Returns the number of rows written.

    The one implementation behind ``kd-nnp data merge`` and the merge of label shards
    (:func:`kd_nnp.teachers.label.merge_label_shards`): a frame the target has no row for gets
    the source's row (labels, or the failure with its error); a source's labels replace a
    failure of the target; a frame labelled in both is kept once when the labels agree
    (``rtol`` 1e-7) and refused with :class:`StoreError` naming both files when they differ;
    a failure never replaces labels. Rows of frames the source's store lacks are skipped.
    Written ``batch`` rows per transaction; resumable: rerunning copies only what is missing."""
    done = target.status()
    statuses = [ls.status() for _, ls in sources]
    # the target's labels of frames a source labelled too, read once (not once per source)
    overlap = {f for st in statuses for f, v in st.items() if v == "ok" and done.get(f) == "ok"}
    have = target.load(overlap) if overlap else {}
    n_ok = Counter(f for st in statuses for f, v in st.items() if v == "ok")
    again = {f for f, c in n_ok.items() if c > 1}  # labelled by several sources
    written = 0
    for (fs, ls), status in zip(sources, statuses, strict=True):
        both = [f for f, v in status.items() if v == "ok" and done.get(f) == "ok"]
        if both:
            new = ls.load(both)
            bad = [f for f in both if not _same_labels(have[f], new[f])]
            if bad:
                raise StoreError(
                    f"frame {bad[0]!r} ({len(bad)} frames in all) has other labels in "
                    f"{ls.path} than in {target.path}; the same frame labelled twice must "
                    "agree (same teacher and settings): remove the wrong file and merge again"
                )
        todo = [
            f
            for f, v in status.items()
            if (v == "ok" and done.get(f) != "ok") or (v == "failed" and f not in done)
        ]
        if not todo:
            continue
        ok = ls.load(todo)
        failed = ls.failures()
        rows: list[tuple[Frame, Labels | None, str | None, float]] = []
        for fr in fs.iter_frames([f for f in todo if f in fs]):
            fid = fr.frame_id
            if fid in ok:
                rows.append((fr, ok[fid], None, 0.0))
                done[fid] = "ok"
                if fid in again:  # compared with the later sources' labels
                    have[fid] = ok[fid]
            elif fid in failed:
                rows.append((fr, None, failed[fid], 0.0))
                done[fid] = "failed"
            if len(rows) >= batch:  # bounded memory; a killed copy keeps what it wrote
                written += target.write(rows)
                rows.clear()
        written += target.write(rows)
    return written

"""``kd-nnp label store=STORE teacher=so3lr``: a teacher's labels for a store (Hydra verb over
:func:`kd_nnp.teachers.label.label_store`, config ``conf/label.yaml``); ``shard=K/N`` labels
one shard, ``merge_shards=true`` joins the shards
(:func:`kd_nnp.teachers.label.merge_label_shards`); ``select.n=N`` labels only the frames an
active selection picks (:mod:`kd_nnp.teachers.select`)."""

from __future__ import annotations

import sys
from typing import Any

from kd_nnp.data.store import FrameStore, label_set_name
from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.teachers.label import LabelReport, ShardMergeReport, label_store, merge_label_shards
from kd_nnp.teachers.select import select_settings
from kd_nnp.utils.shard import parse_shard


def _task(cfg: Any) -> LabelReport | ShardMergeReport:
    """The Hydra task (a user error reaches the dispatcher through
    :func:`kd_nnp.utils.hydra_cli.run_hydra`: one line, exit 1)."""
    from omegaconf import OmegaConf

    shard = None if cfg.shard is None else parse_shard(str(cfg.shard))
    if cfg.merge_shards not in (True, False):
        raise SettingsError(f"merge_shards must be true or false, got {cfg.merge_shards!r}")
    if cfg.merge_shards and shard is not None:
        raise SettingsError(
            "shard=K/N labels one shard, merge_shards=true joins them all: give one of them"
        )

    if OmegaConf.is_missing(cfg.teacher, "name"):
        raise KdNnpError(
            "teacher=custom needs the calculator's factory: add "
            "teacher.name=package.module:factory (a function returning an ASE calculator; "
            "extra settings as +teacher.KEY=VALUE)"
        )
    tcfg = OmegaConf.to_container(cfg.teacher, resolve=True)
    assert isinstance(tcfg, dict)
    tname = tcfg.pop("name")
    check = bool(tcfg.pop("check", True))
    settings = {k: v for k, v in tcfg.items() if not str(k).startswith("_")}
    select = select_settings(cfg)
    if cfg.merge_shards:
        if select.active:
            raise SettingsError("merge_shards=true joins shards: select.n does not apply")
        merged = merge_label_shards(cfg.store, cfg.name or label_set_name(tname), teacher=tname)
        print(merged.summary())
        return merged
    report = label_store(
        cfg.store,
        tname,
        settings=settings,
        name=cfg.name,
        workers=int(cfg.workers),
        threads=int(cfg.threads),
        retry_failed=bool(cfg.retry_failed),
        limit=cfg.limit,
        check=check,
        flush_every=int(cfg.flush_every),
        progress=bool(cfg.progress),
        shard=shard,
        select=select,
    )
    print(report.summary())
    return report


def _check_arguments(argv: list[str]) -> None:
    """Refuse a mistyped ``store=`` or ``shard=`` before Hydra creates its run folder
    ``STORE/logs/label/...``."""
    if any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "--info") for a in argv):
        return
    for a in argv:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+") == "store" and "," not in value and "$" not in value:
            FrameStore(value)  # raises StoreError naming the path
        if eq and key.lstrip("+") == "shard" and value not in ("null", "") and "$" not in value:
            parse_shard(value)  # raises SettingsError


def _shard_tag(shard: Any) -> str:
    """The run folder's suffix of a shard (``3/16`` -> ``_shard-3-of-16``; none: empty)."""
    return "" if shard is None else "_shard-" + str(shard).strip().replace("/", "-of-")


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from kd_nnp.utils.hydra_cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    _check_arguments(argv)
    OmegaConf.register_new_resolver("kd_shard_tag", _shard_tag, replace=True)
    return run_hydra("label", _task, argv)

"""Optimizers and schedulers are Hydra `_partial_` configs (conf/model/optimizer|scheduler)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd_nnp.utils.paths import conf_dir


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_default_is_the_papers_adam_without_scheduler():
    cfg = _compose("train", ["experiment=paper"])
    module = instantiate(cfg.model)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 0.01
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in module.student.parameters() if p.requires_grad
    }


def test_optimizer_and_scheduler_groups():
    cfg = _compose(
        "train",
        ["model/optimizer=adamw", "model/scheduler=cosine", "model.optimizer.lr=0.003",
         "trainer.max_epochs=7"],
    )  # fmt: skip
    out = instantiate(cfg.model).configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 0.003
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.T_max == 7 and out["lr_scheduler"]["interval"] == "epoch"


def test_demo_keeps_its_cosine_decay_to_one_percent():
    cfg = _compose("demo", [])
    assert cfg.model.scheduler._target_.endswith("CosineAnnealingLR")
    assert cfg.model.scheduler.eta_min == pytest.approx(0.01 * cfg.model.optimizer.lr)
    assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs

"""``kd-nnp demo``: the end-to-end job (:func:`kd_nnp.demo.run_demo`; Hydra: ``demo=quick``)."""

from __future__ import annotations

from kd_nnp.demo import run_demo


def main(argv: list[str]) -> int:
    from kd_nnp.utils.hydra_cli import run_hydra

    return run_hydra("demo", run_demo, argv)

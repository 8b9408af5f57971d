"""The demo's held-out split (its end-to-end smoke run: tests/integration/test_demo_quick.py)."""

from __future__ import annotations


def test_split_holds_out_whole_molecules_across_databases():
    """Training crystals (test.db + mech.db) share neither SMILES nor formula with held-out ones."""
    from kd_nnp.demo import _molecule_keys, split_crystals

    ev, tr = split_crystals("test", 100, 8, None, 0, eval_max_atoms=60, train_dbs=["test", "mech"])
    assert len(ev) == 8 and all(len(a) <= 60 for _, a in ev)
    assert all(len(a) <= 100 for _, a in tr)
    held = set().union(*(_molecule_keys(a) for _, a in ev))
    assert not any(_molecule_keys(a) & held for _, a in tr)
    codes = [c for c, _ in tr]
    assert len(codes) == len(set(codes)) and not set(codes) & {c for c, _ in ev}
    # mech.db adds crystals that test.db alone does not have
    _, tr_test = split_crystals("test", 100, 8, None, 0, eval_max_atoms=60)
    assert len(tr) > len(tr_test)
    # deterministic for a seed; n_train takes a prefix of the same order
    ev2, tr2 = split_crystals("test", 100, 8, 5, 0, eval_max_atoms=60, train_dbs=["test", "mech"])
    assert [c for c, _ in ev2] == [c for c, _ in ev] and [c for c, _ in tr2] == codes[:5]


def test_split_logs_each_skipped_crystal_once(caplog):
    """D18: the evaluation and training passes read test.db twice; a skipped crystal is
    reported once (it was logged twice, 0.6 s apart, in the demo's train.log)."""
    import logging

    from kd_nnp.demo import split_crystals

    caplog.set_level(logging.INFO, logger="kd_nnp.demo")
    split_crystals("test", 100, 8, None, 0, eval_max_atoms=60, train_dbs=["test", "mech"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert lines and len(lines) == len(set(lines))

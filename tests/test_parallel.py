"""kd_nnp.utils.parallel.run_tasks: no workers for no work, no more workers than tasks."""

from __future__ import annotations

from kd_nnp.utils import parallel


def _square(x: int) -> int:
    return x * x


class _FakePool:
    """Records the pool size and runs the tasks in-process (no spawn in a unit test)."""

    sizes: list[int] = []

    def __init__(self, n: int, initializer=None, initargs=(), maxtasksperchild=None) -> None:
        _FakePool.sizes.append(n)

    def __enter__(self) -> _FakePool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, fn, items):
        return map(fn, items)


class _FakeContext:
    Pool = _FakePool


def test_no_tasks_starts_no_pool_and_loads_nothing(monkeypatch) -> None:
    # regression: an evaluation rerun with every record reusable started a spawn pool whose
    # workers each loaded their model, for nothing
    def no_context(*a, **k):
        raise AssertionError("a worker pool was started for zero tasks")

    def no_init(*a):
        raise AssertionError("the initializer ran for zero tasks")

    monkeypatch.setattr(parallel.mp, "get_context", no_context)
    for n in (1, 4):
        out = list(
            parallel.run_tasks(_square, [], n_workers=n, initializer=no_init, progress=False)
        )
        assert out == []


def test_pool_never_larger_than_the_task_list(monkeypatch) -> None:
    _FakePool.sizes = []
    monkeypatch.setattr(parallel.mp, "get_context", lambda kind: _FakeContext)
    items = [(i, i) for i in range(3)]
    out = list(parallel.run_tasks(_square, items, n_workers=8, progress=False))
    assert _FakePool.sizes == [3]
    assert sorted(r.value for r in out) == [0, 1, 4]
    assert all(r.ok for r in out)

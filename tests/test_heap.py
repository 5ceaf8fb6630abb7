"""The serving process's heap: start-up's objects frozen out of garbage collection, and
every collection timed for /metrics (teacher_service/heap.py)."""

from __future__ import annotations

import gc

import pytest

from teacher_service.heap import CollectionTimer, freeze
from teacher_service.metrics import ServiceMetrics


@pytest.fixture
def unfrozen():
    """This process is pytest's, not a server's: thaw it for the tests that follow."""
    yield
    gc.unfreeze()


def test_freeze_takes_every_survivor_out_of_later_collections(unfrozen):
    kept = [object(), {"a": [1, 2]}]  # tracked containers, alive through the freeze
    tracked_before = len(gc.get_objects())
    frozen = freeze()
    # frozen objects still die by reference count (the suite's other threads drop some)
    assert 0 < gc.get_freeze_count() <= frozen
    assert frozen >= tracked_before // 2  # the suite's modules and objects, minus garbage
    assert len(gc.get_objects()) < frozen // 10  # what a full collection walks now
    assert not any(x is kept[1] for x in gc.get_objects())
    fresh = {"b": [3]}
    assert any(x is fresh for x in gc.get_objects())  # made after: collected as ever


def test_collection_timer_reports_each_collection_by_generation_until_closed():
    seen: list[tuple[str, float]] = []
    timer = CollectionTimer(lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        timer.close()
    assert [generation for generation, _ in seen][-2:] == ["0", "2"]
    assert all(seconds >= 0 for _, seconds in seen)
    count = len(seen)
    gc.collect()
    assert len(seen) == count


def test_collection_pauses_reach_the_metrics_histogram():
    metrics = ServiceMetrics()
    timer = CollectionTimer(metrics.observe_gc_pause)
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        timer.close()
    text = metrics.render().decode()
    for generation in ("1", "2"):
        line = f'teacher_gc_pause_seconds_count{{generation="{generation}"}}'
        count = next(x for x in text.splitlines() if x.startswith(line))
        assert float(count.rsplit(" ", 1)[1]) >= 1

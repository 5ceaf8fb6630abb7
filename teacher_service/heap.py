"""The serving process's Python heap: frozen once the service is up, its collections timed.

A full collection (generation 2) walks every object the collector tracks, and no thread
runs Python meanwhile: not the event loop that answers calls, not the model worker. With
torch and transformers imported that is some 220,000 objects and 100-250 ms on 2 CPU
cores, and every 12-second level of 128 clients measured had one (bench/bench_load.py's
GC column). Against a
fresh server, 128 simultaneous calls took 153-173 ms at the slowest, 44-62 ms with the
heap frozen (bench/bench_herd.py; docs/benchmarks.md). Nearly all of those objects live as
long as the process (modules, the model), so `freeze` moves them out of the collector's
sight once, as vLLM and SGLang do after their start-up: later full collections walk only
what serving created since."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

GENERATIONS = ("0", "1", "2")


def freeze() -> int:
    """Collect what start-up left, then exclude every surviving object from all later
    collections (their reference counts still free them). Returns how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class CollectionTimer:
    """Calls `observe(generation, seconds)` after every garbage collection of this process
    (gc.callbacks: process-wide, so one per process, removed with `close`)."""

    def __init__(self, observe: Callable[[str, float], None]) -> None:
        self._observe = observe
        self._started = 0.0
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._observe(GENERATIONS[info["generation"]], time.perf_counter() - self._started)

    def close(self) -> None:
        gc.callbacks.remove(self._on_collection)

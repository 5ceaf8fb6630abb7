"""A task metric of the user's own, `task.metric: module:function`, for task.name=file.

The function is called on each evaluation's held-out prompts as

    function(predictions: list[str], references: list[str]) -> float | dict[str, float]

`predictions` are the student's completions (decoded without special tokens, cut at the
eos), `references` the records' completions decoded the same way ("" for a prompt-only
dataset); a float is logged under the function's name, a dict under its keys, each for
greedy completions and (prefixed `sampled_`) for one sample per prompt.

This module does not import the config (config.py imports it to check task.metric when a
config loads): its errors are ValueErrors, which the config turns into ConfigErrors.
"""

from __future__ import annotations

import importlib
import numbers
import os
import sys
from collections.abc import Callable
from typing import Any

MetricFunction = Callable[[list[str], list[str]], Any]
# evaluate.py's own keys: a metric under one of these names would overwrite them
RESERVED = frozenset({"metric", "sampled_metric", "forward_kl", "reverse_kl", "divergence"})


def load_metric(spec: str) -> MetricFunction:
    """Import `module:function` (the working directory is searchable, as `python -m` makes
    it: a metrics.py next to the config is found without installing it)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{spec!r}: expected module:function, e.g. mypkg.metrics:exact")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way while it imports
        raise ValueError(
            f"cannot import {module_name!r} for {spec!r}: {type(error).__name__}: {error}"
        ) from error
    for part in name.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"{spec!r}: {module_name} has no function {name!r}")
    return target


def metric_scores(
    function: MetricFunction, spec: str, predictions: list[str], references: list[str]
) -> dict[str, float]:
    """The function's result as {name: float}; anything else is a ValueError naming it."""
    value = function(predictions, references)
    name = spec.rpartition(":")[2].rpartition(".")[2]  # the function's own name
    items = value.items() if isinstance(value, dict) else [(name, value)]
    scores: dict[str, float] = {}
    for key, score in items:
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise ValueError(
                f"{spec} returned {key}={score!r}: expected a float or a dict of floats"
            )
        key = str(key)
        if key in RESERVED or key.startswith("sampled_"):
            raise ValueError(f"{spec} returned the name {key!r}, which evaluation uses itself")
        scores[key] = float(score)
    return scores

"""Where a model computes: one device, or several under accelerate's device map.

`teacher-service serve --device-map auto` loads a teacher too large for one GPU with
accelerate's placement (`from_pretrained(device_map=...)`): consecutive layers sit on
different devices (or are offloaded to the CPU or disk, their weights on the meta device
until a layer runs) and hooks move the activations from one to the next. Code that feeds
such a model or reads its logits cannot take `next(model.parameters()).device`: the inputs
belong on the embedding's device, and the logits come out on the output layer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STRATEGIES = ("auto", "balanced", "sequential")  # accelerate's, over the node's GPUs
MAP_FORM = 'a JSON object of module name -> device (a GPU index, "cuda:N", "cpu" or "disk")'


def device_map_argument(value: str) -> str | dict[str, int | str]:
    """What from_pretrained's `device_map` gets for `--device-map`: a strategy as is, or the
    explicit module -> device map in the JSON file `value` names."""
    if value in STRATEGIES:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(
            f"--device-map {value}: neither {', '.join(STRATEGIES)} nor a file ({MAP_FORM})"
        )
    try:
        placement = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"--device-map {value}: not JSON ({error})") from None
    if not (
        isinstance(placement, dict)
        and placement
        and all(
            isinstance(device, str) or (isinstance(device, int) and not isinstance(device, bool))
            for device in placement.values()
        )
    ):
        raise ValueError(f"--device-map {value}: must hold {MAP_FORM}")
    return placement


def module_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: the execution device of the hook accelerate attached to it
    (its weights may be offloaded, on the meta device), else where its weights are."""
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(each, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device


def execution_devices(model: torch.nn.Module) -> set[torch.device]:
    """Every device the model's modules compute on: one unless a device map split it."""
    placed = getattr(model, "hf_device_map", None) or {}
    devices = {module_device(model.get_submodule(name)) for name in placed}
    return devices or {next(model.parameters()).device}


def describe_placement(model: torch.nn.Module) -> str:
    """The device map in a line, for the log: e.g. 'cuda:0 (14 modules), cuda:1 (15)'."""
    counts: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        name = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} ({n} modules)" for name, n in counts.items()) or "one device"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved

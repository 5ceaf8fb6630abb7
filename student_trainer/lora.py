"""LoRA adapters on the student (`student.lora`), through peft, an optional extra.

A student of a billion parameters trained in full holds its weights, their gradients and
AdamW's two moments: 16 bytes a parameter in float32, more than a GPU has to spare. With
LoRA the base weights are frozen (and may be bfloat16) and only small low-rank adapters
train, so gradients and optimizer state are those of the adapters alone.

peft injects the adapters into the transformers model in place: the model itself, not the
PeftModel around it, computes with them. So the student keeps the plain model as
`Student.model` (the sampler, the chunked completion rows, evaluation and DDP see the
transformers API they already use), and the PeftModel only for what is peft's own: saving
the adapters (a checkpoint holds them, not the base weights) and merging them into the
weights for an export any transformers code loads.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from student_trainer.config import PEFT_INSTALL, ConfigError, LoraConfig

if TYPE_CHECKING:  # peft is optional: imported where used
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes


def require_peft() -> Any:
    """The peft module, or a ConfigError naming the key that asked for it."""
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ConfigError(
            f"student.lora.r: LoRA needs peft, which is not installed: {PEFT_INSTALL}"
        ) from None


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` holds LoRA adapters (a LoRA run's checkpoint), not a whole model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model directory an adapter checkpoint was trained on (recorded absolute)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"student.model: {path} holds adapters but names no base model")
    return base


def add_adapters(
    model: torch.nn.Module, settings: LoraConfig, base: str | Path, seed: int
) -> PeftModel:
    """Fresh trainable adapters on `model` (in place; base weights frozen), drawn from
    `seed` without touching torch's global streams: every rank, and every rerun, starts
    from the same adapters. The adapters' B starts at zero, so the model is unchanged."""
    peft = require_peft()
    targets = settings.target_modules.strip()
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets
        if targets == "all-linear"
        else [name.strip() for name in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # CPU: the adapters are made before .to(device)
        torch.random.default_generator.manual_seed(seed)
        try:
            adapters = peft.get_peft_model(model, config)
        except ValueError as error:  # e.g. no module matches target_modules
            raise ConfigError(f"student.lora.target_modules: {error}") from None
    # a checkpoint names its base absolutely, so it loads from any working directory
    adapters.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return adapters


def load_adapters(model: torch.nn.Module, checkpoint: str | Path, trainable: bool) -> PeftModel:
    """A checkpoint's adapters on `model` (in place), exactly as they were saved."""
    peft = require_peft()
    with torch.random.fork_rng(devices=[]):  # the adapters' init draws before the load
        return peft.PeftModel.from_pretrained(model, str(checkpoint), is_trainable=trainable)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward (non-reentrant checkpointing: frozen
    inputs and keyword arguments are fine). transformers applies it only in training mode
    with gradients on, so the sampler (eval mode, no gradients) keeps its KV cache."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"student.gradient_checkpointing: {type(model).__name__} does not support it"
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5.24+
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer holds: all of them, or the adapters' with LoRA (in the
    model's order, so an optimizer's state_dict matches from run to run)."""
    return [p for p in model.parameters() if p.requires_grad]

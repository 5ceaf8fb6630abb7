"""The student: a causal LM and its tokenizer, loaded from a model directory or checkpoint.

The tokenizer decides the vocabulary: logits past it (padded embedding rows, as real
checkpoints have) are cut before any loss. A completion ends at the tokenizer's eos or at
any eos the model's generation config adds; a tokenizer without a pad token pads with an
eos (the loss mask comes from lengths, so that is safe: rollouts.py).

With `student.lora` the model carries peft's LoRA adapters, injected in place (lora.py):
`Student.model` stays the transformers model, so sampling, the completion rows and DDP
compute with the adapters through the API they already use, and `Student.adapters` (the
PeftModel) is what a checkpoint saves: the adapters alone. `export_student` merges them
into a plain model directory.

The loss reads the student only where a completion token is predicted, so its forward
stops before the output layer: the body's hidden states at those positions, to which the
loss applies the output layer a chunk of rows at a time (rows.py). The output layer is the
teacher service's (`OutputLayer`: Gemma 2's soft-capping, Cohere's and Granite's logit
scales); a model whose forward changes its logits in a way it does not reproduce (checked
at load, as the service checks its teacher) is read from `model(...).logits` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from causal_lm.output_layer import OutputLayer
from causal_lm.sampling import eos_token_ids
from student_trainer.chat_template import save_tokenizer
from student_trainer.config import DEFAULT_LOSS_CHUNK_ROWS, ConfigError, LoraConfig
from student_trainer.lora import (
    adapter_base,
    add_adapters,
    enable_gradient_checkpointing,
    is_adapter_dir,
    load_adapters,
)
from student_trainer.padded_rows import cut_padded_rows, mark_padded_rows
from student_trainer.rollouts import Batch
from student_trainer.rows import StudentRows

log = logging.getLogger(__name__)


class CompletionForward(torch.nn.Module):
    """The student's forward as the loss needs it: states [N, D] of the positions that
    predict completion tokens (`loss_mask`, objective.completion_rows' rows and order).

    D = H, the body's final hidden states, when `rows_only`; otherwise D = the padded
    vocabulary, rows of `model(...).logits`. The trainer hands this module, not the model,
    to DDP: DDP's forward must be the one that runs the body (its gradient hooks are armed
    there), and it holds the whole model, so the output layer, applied after it, is
    all-reduced with the rest."""

    def __init__(self, model: torch.nn.Module, rows_only: bool) -> None:
        super().__init__()
        self.model = model
        self.rows_only = rows_only

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.rows_only:
            states = self.model.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [B, L, H]
        else:
            states = self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits  # [B, L, padded V]
        return states[:, :-1][loss_mask]  # [N, D]: position i predicts token i + 1


@dataclass
class Student:
    model: torch.nn.Module
    tokenizer: Any
    eos_ids: frozenset[int]
    pad_id: int
    loss_chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS  # student.loss_chunk_rows
    # False: states are rows of model(...).logits (an output layer that cannot be split off)
    rows_only: bool = True
    # the PeftModel around `model` when it carries LoRA adapters (student.lora), else None
    adapters: torch.nn.Module | None = None
    completion_forward: CompletionForward = field(init=False)
    output_layer: OutputLayer | None = field(init=False)

    def __post_init__(self) -> None:
        self.completion_forward = CompletionForward(self.model, self.rows_only)
        self.output_layer = OutputLayer(self.model) if self.rows_only else None

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def saved(self) -> torch.nn.Module:
        """What a checkpoint's save_pretrained writes: the adapters alone with LoRA (the
        base weights never change), else the whole model."""
        return self.model if self.adapters is None else self.adapters

    def completion_rows(
        self, batch: Batch, module: torch.nn.Module | None = None
    ) -> tuple[StudentRows, torch.Tensor]:
        """The student at a batch's completion positions and the tokens they predict [N];
        `module` is `self.completion_forward` as trained (DDP) when it differs."""
        mask = batch.loss_mask.to(self.device)
        states = (module or self.completion_forward)(
            batch.input_ids.to(self.device), batch.attention_mask.to(self.device), mask
        )
        targets = batch.input_ids.to(self.device)[:, 1:][mask]
        rows = StudentRows(states, self.output_layer, self.vocab, self.loss_chunk_rows)
        return rows, targets


def load_student(
    source: str | Path,
    dtype: str,
    device: torch.device,
    loss_chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS,
    *,
    lora: LoraConfig | None = None,
    base: str | Path | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> Student:
    """The model directory `source` (student.model, or a checkpoint) in `dtype`, on `device`.

    A LoRA checkpoint (adapters only) is loaded onto its base model: `base`, else the one
    the checkpoint names; its adapters train when `lora` is given. A whole model with `lora`
    gets fresh adapters drawn from `seed`."""
    adapter_dir = is_adapter_dir(source)
    weights = (base or adapter_base(source)) if adapter_dir else source
    if not (Path(weights) / "config.json").is_file():
        raise ConfigError(f"student.model: {weights} is not a model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        weights, dtype=getattr(torch, dtype), local_files_only=True
    )
    adapters = None
    if adapter_dir:
        adapters = load_adapters(model, source, trainable=lora is not None)
    elif lora is not None:
        adapters = add_adapters(model, lora, weights, seed)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise ConfigError(f"student.model: {rows} output rows < {len(tokenizer)} tokens")
    eos_ids = frozenset(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id
    return Student(
        model,
        tokenizer,
        eos_ids,
        pad if pad is not None else min(eos_ids),
        loss_chunk_rows,
        rows_only=output_layer_splits_off(model),
        adapters=adapters,
    )


def export_student(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    base: str | Path | None = None,
    trim_vocab: bool = False,
) -> Path:
    """A checkpoint as a plain transformers model directory (model + tokenizer): LoRA
    adapters merged into the weights, so AutoModelForCausalLM loads it without peft and
    computes the adapted model's logits; a whole-model checkpoint is written as it is.

    Its generation config suppresses the padded output rows; `trim_vocab` cuts them off
    instead (embeddings and output layer to the tokenizer's size), for code that reads
    no generation config."""
    student = load_student(checkpoint, dtype, torch.device("cpu"), base=base)
    model = student.model if student.adapters is None else student.adapters.merge_and_unload()
    if trim_vocab:
        cut_padded_rows(model, student.tokenizer)
    else:
        mark_padded_rows(model, student.tokenizer)
    out = Path(out_dir)
    model.save_pretrained(out)
    save_tokenizer(student.tokenizer, out)
    return out


@torch.no_grad()
def output_layer_splits_off(model: torch.nn.Module) -> bool:
    """Whether the body's hidden states + OutputLayer give model(...).logits (on a short
    sequence); a model whose body cannot run alone, or whose forward transforms its logits
    some other way, is read from its logits (with a warning)."""
    name = type(model).__name__
    ids = torch.arange(8, device=next(model.parameters()).device).unsqueeze(0)
    expected = model(input_ids=ids).logits[0, :-1]  # [7, padded V]
    try:
        hidden = CompletionForward(model, rows_only=True)(
            ids, torch.ones_like(ids), torch.ones_like(ids[:, 1:], dtype=torch.bool)
        )
        got = OutputLayer(model)(hidden)
    except Exception as error:  # an architecture whose body cannot run alone
        log.warning("%s: the student's loss reads model(...).logits (%s)", name, error)
        return False
    # float rounding of the model's dtype, relative to the largest logit; a wrong path is
    # off by far more
    tolerance = 1e-4 if expected.dtype == torch.float32 else 2e-2
    scale = max(1.0, float(expected.float().abs().max()))
    if torch.allclose(got.float(), expected.float(), atol=tolerance * scale, rtol=0):
        return True
    log.warning(
        "%s: its forward changes the logits after the output layer in a way OutputLayer does "
        "not reproduce; the student's loss reads model(...).logits at every position",
        name,
    )
    return False

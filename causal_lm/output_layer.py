"""A causal LM's output layer as its forward applies it: the teacher's scoring applies it to
the hidden states of the scored rows (teacher_service/forward.py), the student's loss to
its completion rows (student_trainer/rows.py), so both compute logits exactly as
`model(...).logits` does, a chunk of rows at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class OutputLayer:
    """The model's output layer and what its forward does to the logits after it: Gemma 2's
    soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`. backend.py checks
    the result against `model(...).logits` when it loads a model.

    With `vocab_size`, a plain torch.nn.Linear computes the first vocab_size logits only
    (its weight's first rows, a view): padded embedding rows (152064 for 151936 tokens) are
    never computed, and the logits come out as whole rows, so the scoring math reads them
    without a strided copy. Another layer (quantised, or offloaded behind accelerate's hooks)
    runs as it is, and its logits are cut afterwards (a view)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None) -> None:
        self.linear = model.get_output_embeddings()
        config = model.config
        self.scale = getattr(config, "logit_scale", None)
        self.divide = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.vocab_size = vocab_size
        self.cut_weight = (
            vocab_size is not None
            and type(self.linear) is torch.nn.Linear
            and not hasattr(self.linear, "_hf_hook")
            and vocab_size < self.linear.weight.shape[0]
        )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] hidden states -> [T, V'] logits in the model's dtype (V' = vocab_size
        when given, else the output layer's rows)."""
        if self.cut_weight:
            weight, bias = self.linear.weight[: self.vocab_size], self.linear.bias
            logits = F.linear(hidden, weight, None if bias is None else bias[: self.vocab_size])
        else:
            logits = self.linear(hidden)[..., : self.vocab_size]
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

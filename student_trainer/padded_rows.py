"""Padded output rows: ids a model can emit that its tokenizer cannot decode.

Checkpoints pad the output layer past the tokenizer (576 rows for 512 tokens). The
trainer's sampler and the TRL adapter cut those rows, but plain `transformers` sampling
(`generate(do_sample=True)`), or any other loop reading the model's generation config,
draws them unless `suppress_tokens` names them. So every model directory the project
writes (tiny models, checkpoints, pretrain's models, exports) carries that list, set by
`mark_padded_rows`; `export --trim-vocab` removes the rows instead (`cut_padded_rows`).

`python -m student_trainer.padded_rows DIR...` adds the list to model directories written
before (the committed models/ were updated so, without retraining).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: checkpoint.py and distill_lab/tiny_model.py import this
    from transformers import GenerationConfig


def output_rows(model: Any) -> int:
    """Rows of the model's output layer (the ids it can emit); a PeftModel's base model's."""
    return model.get_output_embeddings().weight.shape[0]


def padded_row_ids(model: Any, tokenizer: Any) -> list[int]:
    """The output rows past the tokenizer: ids len(tokenizer) .. rows - 1."""
    rows, vocab = output_rows(model), len(tokenizer)
    if rows < vocab:
        raise ValueError(f"the model has {rows} output rows < {vocab} tokens in its tokenizer")
    return list(range(vocab, rows))


def suppressed(generation_config: GenerationConfig, padded: list[int], vocab: int) -> list[int]:
    """The generation config's suppress_tokens with exactly `padded` as its padded part:
    a token id the config already suppressed (< vocab) is kept, stale padded ids are not."""
    kept = [t for t in generation_config.suppress_tokens or () if t < vocab]
    return sorted({*kept, *padded})


def mark_padded_rows(model: Any, tokenizer: Any) -> None:
    """Set model.generation_config.suppress_tokens to the padded rows (None when there are
    none and nothing else is suppressed), so save_pretrained writes them."""
    ids = suppressed(model.generation_config, padded_row_ids(model, tokenizer), len(tokenizer))
    model.generation_config.suppress_tokens = ids or None


def cut_padded_rows(model: Any, tokenizer: Any) -> None:
    """Cut the input and output embeddings (and config.vocab_size) to the tokenizer's size,
    so no padded row exists; a tied output layer stays tied to the cut embedding."""
    model.resize_token_embeddings(len(tokenizer))
    mark_padded_rows(model, tokenizer)


def mark_model_dir(path: str | Path) -> list[int]:
    """Write the padded rows into an existing model directory's generation_config.json (the
    weights are not read or rewritten: the model is built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # no generation_config.json: the one the model config implies
        model.generation_config = GenerationConfig.from_model_config(config)
    mark_padded_rows(model, AutoTokenizer.from_pretrained(path, local_files_only=True))
    model.generation_config.save_pretrained(path)
    return list(model.generation_config.suppress_tokens or [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m student_trainer.padded_rows",
        description="add the padded output rows to model directories' generation_config.json "
        "(suppress_tokens), so plain transformers sampling never draws them",
    )
    parser.add_argument("model_dir", nargs="+", type=Path)
    for path in parser.parse_args(argv).model_dir:
        ids = mark_model_dir(path)
        print(f"{path}: suppress_tokens {ids[0]}..{ids[-1]}" if ids else f"{path}: none")


if __name__ == "__main__":
    main()

"""A small random-weight Llama model with a real BPE tokenizer, for tests and smoke runs
(`student-trainer tiny-model`), and the builder the built-in tasks' models start from
(models.py; the `addition` task draws its words from the same lists).

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a synthetic
corpus (so any text encodes); the model's embedding is padded past the tokenizer's
vocabulary, as real checkpoints are, so the service's cutting of padded rows is exercised
(its generation config suppresses them: padded_rows.py).
Both are written with save_pretrained and load through the ordinary from_pretrained path.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from student_trainer.chat_template import CHAT_TEMPLATE
from student_trainer.tasks import ITEMS, NAMES

if TYPE_CHECKING:  # imported where used: the CLI imports this module and must start fast
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
VERBS = ("buys", "finds", "gives away", "sells", "loses", "counts")


def _spec(default: Any, help: str) -> Any:
    """A TinyModelSpec field with the help of its `tiny-model` flag (cli.py)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TinyModelSpec:
    """The model's shape and seed; `student-trainer tiny-model` has a flag for each field."""

    vocab_size: int = _spec(
        512,
        "the BPE tokenizer's vocabulary size, special tokens included (the model's "
        "embedding is padded past it)",
    )
    hidden_size: int = _spec(64, "width of the residual stream")
    intermediate_size: int = _spec(176, "width of each MLP")
    num_layers: int = _spec(2, "decoder layers")
    num_heads: int = _spec(4, "attention heads")
    num_kv_heads: int = _spec(2, "key/value heads (grouped-query attention; divides num_heads)")
    max_seq_len: int = _spec(512, "longest sequence (position embeddings)")
    init_std: float = _spec(
        0.2,
        "weights' initial standard deviation: wider than the usual 0.02, so the "
        "distributions are not flat",
    )
    seed: int = _spec(0, "seed of the weights and the tokenizer's corpus")
    tie_word_embeddings: bool = _spec(
        False, "the output layer shares the embedding's weights (as Qwen2-0.5B's does)"
    )


def synthetic_corpus(num_sentences: int, seed: int) -> list[str]:
    """Short story-problem sentences with numbers: enough structure for BPE merges."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        a, b = rng.sample(NAMES, 2)
        item, verb = rng.choice(ITEMS), rng.choice(VERBS)
        n, m = rng.randint(1, 999), rng.randint(1, 99)
        lines.append(f"{a} has {n} {item}s. {a} {verb} {m} of them to {b}, so {b} has {n + m}.")
    return lines


def train_tokenizer(
    vocab_size: int, seed: int, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `corpus` (default: the synthetic story sentences); encoding text
    prepends <bos>, as Llama tokenizers do; chat messages render with CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus or synthetic_corpus(4000, seed), trainer)
    bos_id = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec = TinyModelSpec(),
    tokenizer_from: Path | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Write tokenizer + model (safetensors) to out_dir and return it.

    `tokenizer_from` (a model directory) reuses that model's tokenizer, as a student must;
    `tokenizer` passes one in; without either, one is trained on the synthetic corpus.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from student_trainer.chat_template import save_tokenizer
    from student_trainer.padded_rows import mark_padded_rows

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_from, local_files_only=True)
    elif tokenizer is None:
        tokenizer = train_tokenizer(spec.vocab_size, spec.seed)
    padded_vocab = (len(tokenizer) // 64 + 1) * 64  # always at least one padded row
    config = LlamaConfig(
        vocab_size=padded_vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_seq_len,
        initializer_range=spec.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    mark_padded_rows(model, tokenizer)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


# A smaller random student sharing the tiny model's tokenizer (tests, smoke runs).
TINY_STUDENT_SPEC = TinyModelSpec(
    hidden_size=32, intermediate_size=88, num_layers=1, num_heads=2, num_kv_heads=1, seed=1
)

# The slow-teacher rig (tests/test_slow_teacher.py, bench/bench_slow_teacher.py): a 50M
# Llama whose trainer-sized request (8 x 256 tokens) takes 1-5 s on 2 CPU cores, as a real
# teacher's forward takes seconds on its hardware (about 1.5k tokens/s here)
SLOW_TEACHER_SPEC = TinyModelSpec(
    hidden_size=768,
    intermediate_size=2048,
    num_layers=8,
    num_heads=12,
    num_kv_heads=2,
    max_seq_len=1024,
    init_std=0.02,
)

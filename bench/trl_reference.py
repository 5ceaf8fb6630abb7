"""Reference step time: TRL's in-process-teacher on-policy distillation, same models and shapes.

TRL (>= 1.x) ships on-policy GKD as `trl.DistillationTrainer` (stable API) and, older,
`trl.experimental.gkd.GKDTrainer`, which itself warns that lmbda=1, temperature=1 "is fully
covered by DistillationTrainer"; `trainer=` picks either. GKDTrainer computes the JSD from
both models' full logits (`[B, L, V]`) instead of in chunks. One optimizer step of
DistillationTrainer is: the student samples a completion of
each prompt (transformers `generate`, KV cache, no grad), the student backbone runs with
grad and the teacher backbone without on prompt + completion, the generalized JSD(beta) is
computed over the full vocabulary in chunks from the two hidden states and lm_heads,
backward, clip to max_grad_norm 1.0, AdamW step. Everything runs in this process, on CPU,
in float32.

TRL is not a project dependency: without it, `trl_step_seconds` prints a note to stderr and
returns None. Run this file directly for a quick number on the tiny test models:

    .venv/bin/python bench/trl_reference.py
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

WARMUP_STEPS = 2  # the first optimizer steps (allocator, first generate) are not timed


def trl_step_seconds(
    teacher_dir: str,
    student_dir: str,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    steps: int,
    beta: float = 0.5,
    temperature: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    trainer: str = "distillation",
) -> float | None:
    """Median seconds per optimizer step of TRL's on-policy GKD (lmbda = 1), or None;
    `trainer` is "distillation" (DistillationTrainer) or "gkd" (GKDTrainer).

    `prompts` are token ids (used as they are: no re-tokenization), taken `batch_size` per
    step (cycled as needed); completions are sampled from the student with `temperature`,
    top_p 1.0, top_k disabled, stopping at eos or after `max_new_tokens`. No gradient
    accumulation. The first WARMUP_STEPS steps are run but not timed, so `steps` must be
    larger than that.
    """
    try:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from transformers.utils import logging as hf_logging
        from trl import DistillationConfig, DistillationTrainer
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        print(f"TRL not installed ({exc}): skipped", file=sys.stderr)
        return None

    if steps <= WARMUP_STEPS:
        raise ValueError(f"steps must be > {WARMUP_STEPS} (the untimed warmup), got {steps}")
    if batch_size < 1 or not prompts or any(not p for p in prompts):
        raise ValueError("need batch_size >= 1 and at least one non-empty prompt")

    if trainer not in ("distillation", "gkd"):
        raise ValueError(f"trainer must be 'distillation' or 'gkd', got {trainer!r}")

    class _TokenIdPrompts(DistillationTrainer):
        """Takes the dataset's "prompt" column as token ids instead of text.

        TRL tokenizes text (or chat) prompts itself; overriding this one hook keeps the
        exact prompt ids our trainer uses, and leaves generation and loss untouched.
        """

        def _tokenize_prompts(self, prompts):
            return [list(p) for p in prompts], None, {}

    class _OwnSamplesGKD(GKDTrainer):
        """GKDTrainer normalises its loss by the labels of the batch it was given, but at
        lmbda = 1 it trains on its own samples (the given labels are all -100 here: the
        count would be 0, the loss inf): without that count it takes the token mean over
        the samples' labels, as DistillationTrainer and ours do."""

        def _get_num_items_in_batch(self, batch_samples, device):
            return None

    def token_id_collator(pad_id: int):
        """GKDTrainer's batch from token-id prompts: left-padded prompts (what it samples
        from at lmbda = 1, replacing input_ids and labels with prompt + completion)."""

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            width = max(len(f["prompt"]) for f in features)
            ids = torch.full((len(features), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(features), width), dtype=torch.long)
            for row, feature in enumerate(features):
                prompt = list(feature["prompt"])
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            labels = torch.full_like(ids, -100)
            return {
                "prompts": ids,
                "prompt_attention_mask": mask,
                "input_ids": ids,
                "attention_mask": mask,
                "labels": labels,
            }

        return collate

    class _StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.logs: dict[str, float] = {}
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.update(logs or {})  # with logging off: once, TRL's means over the run

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # TRL/transformers info and advisory warnings
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            student_dir, local_files_only=True, padding_side="left"
        )
        student = AutoModelForCausalLM.from_pretrained(
            student_dir, dtype=torch.float32, local_files_only=True
        )
        teacher = AutoModelForCausalLM.from_pretrained(
            teacher_dir, dtype=torch.float32, local_files_only=True
        )
        # One epoch holds every step (RepeatSampler drops a partial last batch).
        rows = list(itertools.islice(itertools.cycle(prompts), batch_size * steps))
        dataset = Dataset.from_dict({"prompt": rows})
        timer = _StepTimer()
        with (
            tempfile.TemporaryDirectory(prefix="trl-reference-") as out_dir,
            warnings.catch_warnings(),
        ):
            # transformers 5.x deprecation notes about the name `gradient_checkpointing`
            warnings.simplefilter("ignore", FutureWarning)
            common = dict(
                output_dir=out_dir,
                # the step
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=1,
                max_steps=steps,
                learning_rate=lr,
                lr_scheduler_type="constant",
                optim="adamw_torch",  # torch.optim.AdamW, as ours (TRL's default is the fused one)
                weight_decay=0.0,
                max_grad_norm=1.0,
                seed=seed,
                # the loss
                beta=beta,
                temperature=temperature,  # TRL uses one temperature for sampling and loss
                # CPU, float32, no checkpointing (TRL defaults to bf16 and checkpointing)
                use_cpu=True,
                bf16=False,
                fp16=False,
                gradient_checkpointing=False,
                # nothing else in the loop
                report_to="none",
                logging_strategy="no",
                save_strategy="no",
                eval_strategy="no",
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            if trainer == "gkd":  # samples with top_k 0, top_p 1 and stops at eos itself
                config = GKDConfig(**common, lmbda=1.0, max_new_tokens=max_new_tokens)
                kind = _OwnSamplesGKD
                extra = {"data_collator": token_id_collator(pad_id(tokenizer))}
            else:
                config = DistillationConfig(
                    **common,
                    # generation: stop at eos, plain temperature sampling
                    max_completion_length=max_new_tokens,
                    top_p=1.0,
                    top_k=0,
                    min_p=None,
                    repetition_penalty=1.0,
                    log_completions=False,
                )
                kind, extra = _TokenIdPrompts, {}
            runner = kind(
                model=student,
                teacher_model=teacher,
                args=config,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[timer],
                **extra,
            )
            runner.remove_callback(PrinterCallback)  # it prints the end-of-run log dict
            runner.train()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if "completions/mean_length" in timer.logs:
        print(
            f"TRL DistillationTrainer: completions {timer.logs['completions/mean_length']:.1f}"
            f" tokens on average (max_new_tokens {max_new_tokens}; ended by eos:"
            f" {1 - timer.logs.get('completions/clipped_ratio', 1.0):.0%} of them)",
            file=sys.stderr,
        )
    if len(timer.seconds) != steps:  # GKDTrainer counts its steps the same way
        raise RuntimeError(f"TRL ran {len(timer.seconds)} optimizer steps, expected {steps}")
    return statistics.median(timer.seconds[WARMUP_STEPS:])


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos when it has none (as TRL pads then)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


PROMPT_TEXTS = (
    "Ada has 12 apples. Ben gives Ada 3 more, so Ada has",
    "Cleo has 40 marbles. Cleo loses 7 of them, so Cleo has",
    "Dara buys 5 books. Emil gives Dara 9 books, so Dara has",
    "Fay has 101 coins. Fay sells 20 of them to Gus, so Gus has",
    "Hana finds 3 shells. Ivo finds 8 shells, so they have",
    "Juno has 66 stamps. Juno gives away 6 of them, so Juno has",
    "Ben has 250 tickets. Ben counts 50 of them, so Ben has",
    "Emil has 9 pencils. Ada gives Emil 11 pencils, so Emil has",
)


def main() -> int:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from distill_lab.tiny_model import TinyModelSpec, build_tiny_model

    hf_logging.disable_progress_bar()  # "Writing model shards" while building the models
    with tempfile.TemporaryDirectory(prefix="trl-reference-models-") as tmp:
        teacher_dir = build_tiny_model(Path(tmp) / "teacher")
        student_spec = TinyModelSpec(
            hidden_size=32, intermediate_size=88, num_layers=1, num_heads=2, num_kv_heads=1, seed=1
        )
        student_dir = build_tiny_model(
            Path(tmp) / "student", student_spec, tokenizer_from=teacher_dir
        )
        tokenizer = AutoTokenizer.from_pretrained(student_dir, local_files_only=True)
        prompts = [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]
        for name in ("distillation", "gkd"):
            seconds = trl_step_seconds(
                str(teacher_dir),
                str(student_dir),
                prompts,
                max_new_tokens=16,
                batch_size=8,
                steps=10,
                trainer=name,
            )
            if seconds is None:
                return 0
            print(f"TRL {name} (on-policy GKD, lmbda=1): median step {seconds * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

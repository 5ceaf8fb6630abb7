"""TRL's own on-policy distillation trainer, with the teacher service as its teacher.

    from trl import DistillationConfig
    from teacher_client.trl import TeacherServiceDistillationTrainer

    trainer = TeacherServiceDistillationTrainer(
        model="path/to/student",
        teacher="localhost:50051",             # or a TeacherClient (pools, auth, TLS)
        args=DistillationConfig(output_dir="out", beta=0.5),
        train_dataset=dataset,                 # a "prompt" column, as for TRL itself
        top_k=64,
        loss="jsd",                            # or forward_kl, reverse_kl, a loss of yours
    )
    trainer.train()

Install with `pip install './teacher-client[trl]'` (TRL and what it needs; no vLLM).

Why not TRL's own server mode (`trl.experimental.server_distillation`): it talks JSON to a
vLLM `/v1/completions`, refuses to build its client unless vLLM is installed (it only makes
HTTP calls), and supports beta > 0 only on a top-1 support. This subclass of TRL's
`DistillationTrainer` keeps everything of TRL's (data, sampling, buffering, logging,
accelerate) and changes three things:

- the teacher: once per generation batch, right after the student has sampled, the
  completions are scored over gRPC by `TeacherClient.score` (binary tensors, retries,
  deadlines), returning the teacher's top-k ids and log-probs at TRL's `temperature`;
- the loss: an Objective (`teacher_client.objectives`, the service trainer's own), by
  default the exact generalized JSD(args.beta) on that top-k support plus one tail bucket
  against the student's full distribution, for any beta in [0, 1]; `loss=` names another
  registered loss on the top-k support (forward_kl, reverse_kl, jsd, or one of yours) and
  `loss_args=` its own keys. Its per-token loss on the completion tokens is reduced as TRL
  reduces its loss (sum over completion tokens / the batch's token count);
- padded rows: a checkpoint's output layer is often wider than its tokenizer (e.g. 384 rows
  for 352 tokens); TRL would sample those ids, which no teacher can score. Generation
  suppresses them (`suppress_tokens`) and the loss cuts the student's logits to the
  teacher's vocabulary, so sampling and loss see the same distribution.

Written against TRL 1.16 (`TESTED_TRL`); it overrides two of DistillationTrainer's hooks,
`_generate_and_score_completions` and `_compute_loss`, and fails at construction if a TRL
without them is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from trl import DistillationConfig, DistillationTrainer

from teacher_client.client import TeacherClient
from teacher_client.messages import ScoreOptions, ScoreResult, TeacherInfo
from teacher_client.objectives import SHARED_KEYS, Objective, TeacherRows, make_objective

TESTED_TRL = "1.16.0"
DEFAULT_TOP_K = 64
HOOKS = ("_generate_and_score_completions", "_compute_loss")
# Keys of the inputs dict that carry the teacher's answer through TRL's buffering (which
# shuffles and splits every tensor along the batch axis, so they must be [B, ...]).
SUPPORT_IDS, SUPPORT_LOGPROBS = "teacher_support_ids", "teacher_support_logprobs"
TARGET_LOGPROBS = "teacher_target_logprobs"
# Multimodal fields TRL's own loss passes to the student forward; passed through unchanged.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def score_in_chunks(
    client: TeacherClient,
    sequences: Sequence[list[int]],
    score_from: Sequence[int],
    info: TeacherInfo,
    options: ScoreOptions,
) -> list[ScoreResult]:
    """`client.score` over as many requests as the server's per-request limits need.

    A generation batch can exceed `max_sequences_per_request` / `max_tokens_per_request`
    (the server refuses such a request whole; a limit of 0 is none); the results come back
    in order.
    """
    max_sequences = info.max_sequences_per_request or len(sequences)  # 0: no limit
    max_tokens = info.max_tokens_per_request or sum(map(len, sequences))
    results: list[ScoreResult] = []
    start, tokens = 0, 0
    for end, sequence in enumerate(sequences):
        full = end - start >= max_sequences
        if end > start and (full or tokens + len(sequence) > max_tokens):
            results += client.score(sequences[start:end], list(score_from[start:end]), options)
            start, tokens = end, 0
        tokens += len(sequence)
    if start < len(sequences):
        results += client.score(sequences[start:], list(score_from[start:]), options)
    return results


def teacher_support(
    results: Sequence[ScoreResult | None], width: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack per-sequence top-k answers into [B, width, k] ids (int64) and log-probs (float32),
    and the log-probs of the completion tokens themselves into [B, width] (float32).

    Row j of sequence b is completion token j. Positions past a completion's end (TRL pads
    completions on the right), and sequences with no completion (None), get a one-token
    distribution (id 0, log-prob 0, the other ids repeats of it): finite. The loss is taken
    on the completion tokens alone.
    """
    ids = np.zeros((len(results), width, top_k), dtype=np.int64)
    logprobs = np.zeros((len(results), width, top_k), dtype=np.float32)
    targets = np.zeros((len(results), width), dtype=np.float32)
    for row, result in enumerate(results):
        if result is None:
            continue
        count = len(result.topk_ids)
        ids[row, :count] = result.topk_ids
        logprobs[row, :count] = result.topk_logprobs
        targets[row, :count] = result.target_logprobs
    return torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(targets)


def padded_rows(model: Any, vocab_size: int) -> list[int]:
    """The student's output rows past the teacher's vocabulary: ids no teacher can score."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
    if rows < vocab_size:
        raise ValueError(
            f"the student has {rows} output rows but the teacher's vocabulary has {vocab_size} "
            "tokens: they do not share a tokenizer"
        )
    return list(range(vocab_size, rows))


class TeacherServiceDistillationTrainer(DistillationTrainer):
    """TRL's DistillationTrainer whose teacher is a teacher service, reached over gRPC.

    `teacher`: a `TeacherClient` (replica pools, auth, TLS, deadlines: see its docs) or an
    address for one. `top_k`: how many of the teacher's most likely tokens per position the
    loss uses (plus the tail bucket); capped at the teacher's vocabulary. `loss`: the
    registered loss (teacher_client.objectives) to train with, on the top-k support:
    forward_kl, reverse_kl, jsd (the default, at `args.beta` unless `loss_args` gives a
    beta) or one of yours; `loss_args`: its own keys. A loss on another support (full,
    sampled) is refused: this trainer fetches the top-k. `check_tokenizer`: refuse a teacher
    whose tokenizer assigns other ids (the handshake), rather than train on log-probs of
    other tokens. Every other argument is DistillationTrainer's; `teacher_model` is not one
    (the service is the teacher). `args.temperature` (sampling, the teacher's scoring and
    the loss alike, as in TRL) and every generation setting apply.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "distillation", "teacher-service"]
    _name = "Teacher Service Distillation"

    def __init__(
        self,
        model: Any,
        teacher: TeacherClient | str,
        args: DistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
        *,
        top_k: int = DEFAULT_TOP_K,
        loss: str = "jsd",
        loss_args: dict[str, Any] | None = None,
        check_tokenizer: bool = True,
        **kwargs: Any,
    ) -> None:
        missing = [hook for hook in HOOKS if not hasattr(DistillationTrainer, hook)]
        if missing:
            raise RuntimeError(
                f"this TRL's DistillationTrainer lacks {missing}: teacher_client.trl is written "
                f"against trl=={TESTED_TRL}"
            )
        if "teacher_model" in kwargs:
            raise TypeError("the service is the teacher: pass `teacher`, not `teacher_model`")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (the loss needs a support), got {top_k}")
        self.teacher_client = TeacherClient(teacher) if isinstance(teacher, str) else teacher
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        objective = self._objective(loss, loss_args or {}, top_k)  # refused before any call
        if check_tokenizer:
            self.teacher_info = self.teacher_client.check_tokenizer(self._tokenizer)
        else:
            self.teacher_info = self.teacher_client.info()
        self.teacher_vocab_size = self.teacher_info.vocab_size
        self.teacher_top_k = min(top_k, self.teacher_vocab_size)
        self.objective = replace(objective, top_k=self.teacher_top_k)
        self._suppress_padded_rows(padded_rows(self.model, self.teacher_vocab_size))

    def _objective(self, loss: str, loss_args: dict[str, Any], top_k: int) -> Objective:
        """Loss `loss` with its own `loss_args` at TRL's temperature, on the top-k support;
        jsd at args.beta unless loss_args has a beta. ValueError naming `loss` or the key.
        The keys every loss shares are this trainer's: top_k (its argument), the temperature
        (TRL's), and no student candidates."""
        shared = sorted(set(SHARED_KEYS) & set(loss_args))
        if shared:
            raise ValueError(
                f"loss_args: {shared} are set by the trainer (top_k=, args.temperature; no "
                "student candidates), not by loss_args"
            )
        own = {"beta": self.beta, **loss_args} if loss == "jsd" else dict(loss_args)
        try:
            objective = make_objective(loss, temperature=self.temperature, top_k=top_k, **own)
        except ValueError as error:
            message = str(error)
            named = message if message.startswith("loss:") else f"loss_args.{message}"
            raise ValueError(named) from None
        if objective.support != "topk":
            raise ValueError(
                f"loss: {loss} trains on the teacher's {objective.support} answer; this trainer "
                "fetches the top-k support only (forward_kl, reverse_kl, jsd, or a loss of yours "
                "on topk)"
            )
        return objective

    def _suppress_padded_rows(self, padded: list[int]) -> None:
        """Never sample an id past the teacher's vocabulary (the service would refuse it).

        transformers' generate takes `suppress_tokens` (-inf logits); TRL passes both its
        GenerationConfig and its generation kwargs to generate, so both get the ids. vLLM
        (`use_vllm`) takes no such option from here: it needs `allowed_token_ids` in
        `args.generation_kwargs`, which TRL hands to vLLM's SamplingParams.
        """
        if not padded:
            return
        if self.use_vllm:
            allowed = (self.args.generation_kwargs or {}).get("allowed_token_ids")
            vocab = self.teacher_vocab_size
            if allowed is None or max(allowed) >= vocab:
                raise ValueError(
                    f"the student's output rows {padded[0]}..{padded[-1]} are padding past the "
                    f"teacher's {vocab} tokens, and vLLM would sample them: set "
                    f"generation_kwargs={{'allowed_token_ids': list(range({vocab}))}}"
                )
            return
        suppressed = sorted({*(self.generation_config.suppress_tokens or []), *padded})
        self.generation_config.suppress_tokens = suppressed
        self.generation_kwargs["suppress_tokens"] = suppressed

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's sampling, then one teacher call for the whole generation batch.

        Done here rather than per micro-batch so that gradient accumulation reuses the
        teacher's answer the way TRL reuses the samples (it buffers this dict).
        """
        output = super()._generate_and_score_completions(inputs)
        completion_ids = output["completion_ids"]
        prompt_ids, prompt_mask = output["prompt_ids"].cpu(), output["prompt_mask"].cpu().bool()
        completions, completion_mask = completion_ids.cpu(), output["completion_mask"].cpu().bool()
        sequences, starts, rows = [], [], []
        for row in range(prompt_ids.size(0)):
            prompt = prompt_ids[row][prompt_mask[row]].tolist()
            completion = completions[row][completion_mask[row]].tolist()
            if completion:  # nothing to score (or train on) otherwise
                sequences.append(prompt + completion)
                starts.append(len(prompt))
                rows.append(row)
        answers: list[ScoreResult | None] = [None] * prompt_ids.size(0)
        if sequences:
            options = self.objective.score_options()
            scored = score_in_chunks(
                self.teacher_client,
                sequences,
                starts,
                self.teacher_info,
                options,
            )
            for row, result in zip(rows, scored):
                answers[row] = result
        packed = teacher_support(answers, completion_ids.size(1), self.teacher_top_k)
        for key, value in zip((SUPPORT_IDS, SUPPORT_LOGPROBS, TARGET_LOGPROBS), packed):
            output[key] = value.to(completion_ids.device)
        return output

    def _compute_loss(
        self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The objective's per-token loss against the service's answer (by default the top-k
        + tail generalized JSD), on the completion tokens.

        Returns what TRL's own `_compute_loss` returns (the loss, the sum of the student's
        per-token entropies and the number of trained tokens) and reduces the same way, so
        TRL's `compute_loss`, logging and gradient accumulation work unchanged.
        """
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)

        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        model_inputs |= {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}
        if "logits_to_keep" in self.model_kwarg_keys:
            model_inputs["logits_to_keep"] = keep + 1  # the last one predicts past the end
        # The whole model (not backbone + lm_head as TRL's chunked loss does), so that any
        # logit scaling or soft-capping of the architecture is applied as in generation.
        logits = unwrapped_student(**model_inputs, use_cache=False).logits
        logits = logits[:, :-1, : self.teacher_vocab_size][:, -keep:]  # row j predicts completion j

        mask = loss_mask.to(logits.device).bool()  # [B, keep]
        teacher = TeacherRows(
            inputs[TARGET_LOGPROBS].to(logits.device)[mask],  # [n]
            inputs[SUPPORT_IDS].to(logits.device)[mask],  # [n, k]
            inputs[SUPPORT_LOGPROBS].to(logits.device)[mask],  # [n, k]
            None,
        )
        targets = inputs["completion_ids"].to(logits.device)[mask]  # [n]
        values, _ = self.objective.token_losses(logits[mask], targets, teacher)  # [n]
        # back in place, zeros elsewhere: [B, keep], summed as TRL sums its per-token loss
        per_token = torch.zeros(mask.shape, dtype=values.dtype, device=logits.device)
        per_token = per_token.masked_scatter(mask, values)
        num_valid = mask.sum()
        if num_items_in_batch is None:
            loss = per_token.sum() / num_valid.clamp(min=1)
        else:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(logits.device)
            loss = per_token.sum() / num_items_in_batch
        with torch.no_grad():
            log_q = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            entropy = torch.special.entr(log_q.exp()).sum(-1)
            entropy_sum = torch.where(mask, entropy, torch.zeros_like(entropy)).sum()
        return loss, entropy_sum, num_valid

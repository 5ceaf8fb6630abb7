"""The Hugging Face backend: a local causal-LM directory, scored in padded batches.

Everything here runs on the model worker thread (see batcher.py); nothing here knows
about gRPC. A batch is right-padded: under a causal mask the padding sits after every
real position, so a sequence's log-probs do not depend on what it was batched with.

Scoring runs the model's body (forward.py), applies the output layer to the scored rows
only, in chunks of a memory budget, and computes every sequence's rows together, grouped
by what their requests ask for; the results reach the host in one copy per group (pinned
and non-blocking on CUDA) and are split per sequence there.

A model larger than one GPU is loaded with a device map (causal_lm/placement.py): its inputs go to
the embedding's device (`body.device`), and the logits, the scoring math and the sampling
generators live on the output layer's (`device`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from causal_lm.output_layer import OutputLayer
from causal_lm.placement import (
    describe_placement,
    device_map_argument,
    module_device,
    resolve_device,
)
from causal_lm.sampling import Completion, SamplingOptions, eos_token_ids, next_token, sample
from teacher_client.fingerprint import tokenizer_fingerprint
from teacher_service.backend_api import Capability, ForwardTokens, ScoredBatch, ScoreItem
from teacher_service.codec import torch_dtype
from teacher_service.forward import (
    MIN_SHARED_TOKENS,
    Body,
    ScoredRows,
    item_rows,
    padded,
)
from teacher_service.scoring import (
    TENSOR_FIELDS,
    ScoreOptions,
    SequenceScores,
    score_chunked,
    split_scores,
)

log = logging.getLogger(__name__)
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_SCORE_CHUNK_MB = 256  # float32 logits computed at once; the math adds a few times that


class HFBackend:
    """A transformers causal LM and its tokenizer, loaded from a local directory: a
    backend_api.Backend with every capability."""

    name = "huggingface"
    capabilities = tuple(Capability)
    samples_while_scoring = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        model_id: str,
        score_chunk_mb: int = DEFAULT_SCORE_CHUNK_MB,
        share_prefixes: bool = True,
        pack: bool = True,
        deterministic: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        # where the logits come out: the scoring math and the sampling generators run there
        self.device = module_device(model.get_output_embeddings())
        self.model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.vocab_size = len(tokenizer)
        logits_rows = model.get_output_embeddings().weight.shape[0]
        if self.vocab_size > logits_rows:
            raise ValueError(
                f"the tokenizer has {self.vocab_size} tokens but the model only {logits_rows} "
                "output rows: tokenizer and model do not belong together"
            )
        self.max_seq_len = _max_seq_len(model.config, tokenizer)
        self.bos_token_id = _id_or_minus_one(tokenizer.bos_token_id)
        self.eos_token_id = _id_or_minus_one(tokenizer.eos_token_id)
        self.pad_token_id = _id_or_minus_one(tokenizer.pad_token_id)
        self.eos_ids = frozenset(eos_token_ids(model, tokenizer))
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.body = Body(model)
        self.output_layer = OutputLayer(model, self.vocab_size)  # logits [T, V]: padding cut
        self.chunk_rows = max(1, score_chunk_mb * 2**20 // (4 * logits_rows))
        # False: model(...).logits over every position, for models whose forward changes the
        # logits in a way OutputLayer does not know (and to compare against in benchmarks)
        self.rows_only = self._rows_reproduce_the_logits()
        # run a prefix that several sequences of a batch share once (checked below)
        self.share_prefixes = share_prefixes and self.rows_only and self._sharing_is_exact()
        # several short unshared sequences in one row instead of padding (checked below)
        self.pack = pack and self.rows_only and self._packing_is_exact()
        # batch-invariant scores: every sequence alone (score_batch)
        self.deterministic = deterministic

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        score_chunk_mb: int = DEFAULT_SCORE_CHUNK_MB,
        share_prefixes: bool = True,
        pack: bool = True,
        device_map: str = "",
        deterministic: bool = False,
    ) -> HFBackend:
        """`device_map` (auto, balanced, sequential or a JSON file's path) places the layers
        across the node's devices with accelerate instead of putting the model on `device`."""
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {model_dir}: no config.json (not a model directory)")
        if device_map and device != "auto":
            raise ValueError(f"--device-map {device_map} and --device {device}: pick one of them")
        placement = device_map_argument(device_map) if device_map else None
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if placement is not None:
            log.info("loading %s with device map %s in %s", path, device_map, dtype)
            model = AutoModelForCausalLM.from_pretrained(
                path,
                device_map=placement,
                dtype=torch_dtype(dtype),
                local_files_only=True,
            )  # no .to(): accelerate's hooks move the activations between the devices
            log.info("%s placed on %s", path.name, describe_placement(model))
        else:
            target = resolve_device(device)
            log.info("loading %s on %s in %s", path, target, dtype)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(dtype), local_files_only=True
            ).to(target)
        return cls(
            model,
            tokenizer,
            model_id=path.resolve().name,
            score_chunk_mb=score_chunk_mb,
            share_prefixes=share_prefixes,
            pack=pack,
            deterministic=deterministic,
        )

    @torch.inference_mode()
    def _rows_reproduce_the_logits(self) -> bool:
        """Whether the body + OutputLayer give model(...).logits on a short sequence."""
        ids = torch.arange(min(8, self.vocab_size))
        try:
            expected = self.model(input_ids=ids.unsqueeze(0).to(self.body.device)).logits[0]
            expected = expected[:, : self.vocab_size]  # padded rows are never scored
            got = self.output_layer(self.body.hidden([ids])[0])
        except Exception as error:  # an architecture whose body cannot run alone
            log.warning("%s: scoring every position (%s)", self.model_id, error)
            return False
        if _agree([got], [expected]):
            return True
        log.warning(
            "%s: its forward changes the logits after the output layer in a way this service "
            "does not reproduce; scoring from model(...).logits over every position",
            self.model_id,
        )
        return False

    @torch.inference_mode()
    def _sharing_is_exact(self) -> bool:
        """Whether suffixes run after a shared prefix's KV cache get the hidden states they
        get alone; a model whose cache cannot be shared that way is scored unshared."""
        length = MIN_SHARED_TOKENS + 4
        if self.vocab_size < 2 or self.max_seq_len < length:
            return False
        prefix = torch.arange(length - 2) % self.vocab_size
        items = [
            ScoreItem(torch.cat([prefix, torch.tensor([a, 1 - a])]), length - 3, ScoreOptions())
            for a in (0, 1)
        ]
        try:
            shared = self.body.scored_rows(items, share_prefixes=True).rows
            alone = self.body.scored_rows(items, share_prefixes=False).rows
        except Exception as error:  # a cache that cannot be repeated or selected per row
            log.warning("%s: prefixes are not shared (%s)", self.model_id, error)
            return False
        if _agree(shared, alone):
            return True
        log.warning("%s: its KV cache does not reproduce a prefix; not sharing", self.model_id)
        return False

    @torch.inference_mode()
    def _packing_is_exact(self) -> bool:
        """Whether sequences packed into one row (position ids restarting, no mask) get the
        hidden states they get padded; an attention that lets them see each other is not."""
        if self.max_seq_len < 6:
            return False
        ids = [torch.arange(length) % self.vocab_size for length in (6, 2, 3)]
        try:
            packed, fed = self.body.each(ids, pack=True)
        except Exception as error:  # an architecture that takes no position ids
            log.warning("%s: sequences are not packed (%s)", self.model_id, error)
            return False
        padded, _ = self.body.each(ids, pack=False)
        if fed < 3 * 6 and _agree(packed, padded):
            return True
        log.warning("%s: packed sequences attend to each other; padding instead", self.model_id)
        return False

    @torch.inference_mode()
    def score_batch(self, items: list[ScoreItem]) -> ScoredBatch:
        """Every item's rows, and the tokens the forwards ran.

        With `deterministic`, every item runs alone: a forward of its own and its own
        output-layer chunks, so the work is split the same way whatever it is batched with
        (a matrix product's reduction order depends on its shapes: a sequence's rows in a
        padded, packed or shared batch are computed by other kernels or blockings than
        alone, to the last bits; Thinking Machines, "Defeating Nondeterminism in LLM
        Inference", 2025). Its bytes then depend on the sequence and its options only."""
        if self.deterministic and len(items) > 1:
            alone = [self._score_together([item]) for item in items]
            tokens = ForwardTokens(
                sum(batch.forward_tokens.computed for batch in alone),
                sum(batch.forward_tokens.padding for batch in alone),
            )
            return ScoredBatch([batch.scores[0] for batch in alone], tokens)
        return self._score_together(items)

    def _score_together(self, items: list[ScoreItem]) -> ScoredBatch:
        """Every item's rows, scored together with the rows of items that ask the same, and
        the tokens the forwards ran."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for n, item in enumerate(items):
            width = None if item.candidate_ids is None else item.candidate_ids.shape[-1]
            groups[item.options, width].append(n)
        # what the math reads besides the hidden states goes to the device before the forward
        # is queued: on CUDA a copy from pageable memory waits for the queue to drain, so
        # after the forward it would hold the math's launches back until the forward ends
        inputs = {key: self._group_inputs(items, group, key[1]) for key, group in groups.items()}
        if self.rows_only:
            found = self.body.scored_rows(items, self.share_prefixes, self.pack)
            project = self.output_layer
        else:
            found, project = self._all_logits(items), None
        results: list[SequenceScores | None] = [None] * len(items)
        for (options, width), members in groups.items():
            sizes = [found.rows[n].shape[0] for n in members]
            targets, candidates = inputs[options, width]
            scores = score_chunked(
                torch.cat([found.rows[n] for n in members]),
                targets,
                self.vocab_size,
                options,
                candidates,
                project=project,
                chunk_rows=self.chunk_rows,
            )
            for n, part in zip(members, split_scores(_to_host(scores), sizes)):
                results[n] = part
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the non-blocking copies have landed
        for n, item in enumerate(items):
            if item.sample_next is not None:
                options, generator = item.sample_next
                last = found.next_rows[n] if project is None else project(found.next_rows[n])
                token = next_token(
                    last[:, : self.vocab_size], options.temperature, options.top_p, generator
                )
                results[n].next_token_id = int(token)
        ran = ForwardTokens(found.computed_tokens, found.padding_tokens)
        return ScoredBatch(results, ran)  # type: ignore[arg-type]

    def _group_inputs(
        self, items: list[ScoreItem], members: list[int], width: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The members' targets [N] and candidate ids [N, width] (or None), N = their scored
        rows (len - score_from each), in order, on the device the logits come out on."""
        targets = torch.cat([items[n].token_ids[items[n].score_from :] for n in members])
        candidates = None
        if width is not None:
            sizes = [items[n].token_ids.numel() - items[n].score_from for n in members]
            candidates = torch.cat(
                [items[n].candidate_ids.expand(size, width) for n, size in zip(members, sizes)]
            ).to(self.device)
        return targets.to(self.device), candidates

    def _all_logits(self, items: list[ScoreItem]) -> ScoredRows:
        """The items' rows of model(...).logits over every position (rows_only False)."""
        input_ids, attention_mask = padded([item.token_ids[: item.forward_len] for item in items])
        logits = self.model(
            input_ids=input_ids.to(self.body.device),
            attention_mask=attention_mask.to(self.body.device),
            use_cache=False,
        ).logits.to(self.device)  # where the targets and the sampling generators are
        rows = [item_rows(item, logits[row][:0], logits[row]) for row, item in enumerate(items)]
        computed = input_ids.numel()
        padding = computed - int(attention_mask.sum())
        return ScoredRows(
            [scored for scored, _ in rows], [last for _, last in rows], computed, padding
        )

    def generate(
        self,
        prompts: list[list[int]],
        options: SamplingOptions,
        generator: torch.Generator | None,
    ) -> list[Completion]:
        """Complete one chunk of prompts; `generator` comes from sampling.new_generator."""
        pad = self.pad_token_id if self.pad_token_id >= 0 else max(self.eos_token_id, 0)
        return sample(
            self.model,
            prompts,
            options,
            vocab_size=self.vocab_size,
            eos_ids=self.eos_ids,
            pad_id=pad,
            generator=generator,
        )


def _id_or_minus_one(token_id: int | None) -> int:
    return -1 if token_id is None else int(token_id)


def _max_seq_len(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return DEFAULT_MAX_SEQ_LEN


def _agree(got: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    """The load-time checks' equality: float rounding of the model's dtype, relative to the
    largest value (a few ulps in half precision; a wrong path is off by far more)."""
    tolerance = 1e-4 if expected[0].dtype == torch.float32 else 2e-2
    scale = max(1.0, max(float(t.float().abs().max()) for t in expected))
    return all(
        torch.allclose(a.float().to(b.device), b.float(), atol=tolerance * scale, rtol=0)
        for a, b in zip(got, expected, strict=True)
    )


def _to_host(scores: SequenceScores) -> SequenceScores:
    """The CPU copy of every tensor: into pinned memory without waiting on CUDA (the caller
    synchronises once per batch), as is on the CPU."""
    moved = {}
    for name in TENSOR_FIELDS:
        tensor = getattr(scores, name)
        if tensor is not None and tensor.device.type == "cuda":
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            tensor = pinned.copy_(tensor, non_blocking=True)
        moved[name] = tensor
    return SequenceScores(**moved)

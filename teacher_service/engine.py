"""What every front end shares: one backend, one model worker, one dynamic batcher.

The gRPC servicer and the HTTP routes (native, vLLM/OpenAI and TGI dialects) all turn
their requests into the proto messages of protos/teacher.proto and call the engine, so
validation, batching and error semantics are the same whichever door a request uses.
"""

from __future__ import annotations

from typing import Any

from teacher_client.proto import teacher_pb2 as pb
from teacher_service import __version__
from teacher_service.backend import ScoreItem
from teacher_service.batcher import DynamicBatcher, ModelWorker
from teacher_service.config import ServerConfig
from teacher_service.metrics import ServiceMetrics
from teacher_service.sampling import Completion, SamplingOptions, chunk_prompts, new_generator
from teacher_service.scoring import SequenceScores
from teacher_service.validation import (
    ModelLimits,
    RequestError,
    parse_generate_request,
    parse_score_request,
)


class Unsupported(RequestError):
    """A request this backend cannot answer (a remote upstream lacks the capability)."""


class Engine:
    def __init__(self, backend: Any, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.limits = ModelLimits(backend.vocab_size, backend.max_seq_len, config.limits)
        self.metrics = ServiceMetrics()
        self.worker = ModelWorker()
        self.batcher: DynamicBatcher[ScoreItem, SequenceScores] = DynamicBatcher(
            backend.score_batch,
            self.worker,
            length=lambda item: item.forward_len,
            max_batch_tokens=config.limits.max_batch_tokens,
            max_wait_ms=config.max_wait_ms,
            max_queued_tokens=config.limits.max_queued_tokens,
            observer=self.metrics,
        )
        self.metrics.track_queue(lambda: self.batcher.pending)

    def start(self) -> None:
        """Start the batcher's loop (call from the event loop that will serve requests)."""
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        self.worker.close()

    def info(self) -> pb.InfoResponse:
        backend, limits = self.backend, self.config.limits
        return pb.InfoResponse(
            model_id=backend.model_id,
            vocab_size=backend.vocab_size,
            tokenizer_fingerprint=backend.tokenizer_fingerprint,
            max_seq_len=backend.max_seq_len,
            bos_token_id=backend.bos_token_id,
            eos_token_id=backend.eos_token_id,
            pad_token_id=backend.pad_token_id,
            backend=backend.name,
            device=str(backend.device),
            model_dtype=backend.model_dtype,
            max_batch_tokens=limits.max_batch_tokens,
            max_tokens_per_request=limits.max_tokens_per_request,
            max_sequences_per_request=limits.max_sequences_per_request,
            max_message_bytes=limits.max_message_bytes,
            capabilities=list(backend.capabilities),
            server_version=__version__,
        )

    async def score(
        self,
        request: pb.ScoreRequest,
        *,
        ranks: bool = False,
        sample_next: SamplingOptions | None = None,
    ) -> list[SequenceScores]:
        """Validate and score; `ranks` also returns each actual token's rank (vLLM dialect).

        `sample_next` also samples the token after each sequence from the same forward pass
        (`next_token_id`; sequence n draws from its own generator, seeded seed + n, so the
        result does not depend on what it is batched with). Local backends only.
        """
        self._require_capabilities(request, ranks)
        items = parse_score_request(request, self.limits, ranks=ranks)
        if sample_next is not None:
            if not getattr(self.backend, "samples_while_scoring", False):
                raise Unsupported(f"the {self.backend.name} backend cannot sample while scoring")
            for n, item in enumerate(items):
                seeded = SamplingOptions(
                    1, sample_next.temperature, sample_next.top_p, (sample_next.seed + n) % 2**64
                )
                item.sample_next = (seeded, new_generator(seeded, self.backend.device))
        results = await self.batcher.submit(items)
        self.metrics.tokens_scored.inc(sum(int(r.target_logprobs.numel()) for r in results))
        return results

    def _require_capabilities(self, request: pb.ScoreRequest, ranks: bool) -> None:
        """Refuse, naming the capability, what this backend cannot compute (remote ones)."""
        needed = {
            "topk": ("top_k", request.top_k > 0),
            "full": ("full", request.full),
            "candidates": (
                "sequences[].candidate_ids",
                any(s.HasField("candidate_ids") for s in request.sequences),
            ),
            "ranks": ("the actual token's rank", ranks),
            "temperature": (
                "temperature",
                request.HasField("temperature") and request.temperature != 1.0,
            ),
        }
        have = set(self.backend.capabilities)
        for capability, (field, asked) in needed.items():
            if asked and capability not in have:
                raise Unsupported(
                    f"{field}: the {self.backend.name} backend cannot provide the "
                    f"'{capability}' capability (it has: {', '.join(sorted(have))})"
                )

    async def generate(self, request: pb.GenerateRequest) -> list[Completion]:
        if "generate" not in self.backend.capabilities:
            raise Unsupported(f"Generate: the {self.backend.name} backend cannot generate")
        prompts, options = parse_generate_request(request, self.limits)
        generator = new_generator(options, self.backend.device)
        completions: list[Completion] = []
        budget = self.config.limits.max_batch_tokens
        for chunk in chunk_prompts(prompts, options.max_new_tokens, budget):
            completions += await self.worker.run(self.backend.generate, chunk, options, generator)
        return completions

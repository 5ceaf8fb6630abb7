"""Remote backends: the service in front of an existing vLLM/SGLang (OpenAI dialect) or TGI
server, so its clients get the gRPC API, the dynamic batcher and the metrics anyway.

The upstream computes the log-probs; this side only needs the model's tokenizer (a local
directory) for the tokenizer handshake, the vocabulary size and the text a TGI upstream
wants. What an upstream cannot give is not approximated: `capabilities` lists what it
can, and the engine refuses anything else naming the missing capability.

- openai: `POST /v1/completions` with `prompt_logprobs = k` (vLLM's extension; each
  position holds the top-k plus the actual token with its rank), `max_tokens = 1`. Prompt
  log-probs of vLLM are those of the raw logits, so only temperature 1 is offered; no
  candidate scoring and no full distributions. Generate asks for `return_token_ids`.
- tgi: `POST /generate` with `decoder_input_details` (the log-prob of each input token:
  no top-k, no candidates, no ranks, raw logits). TGI takes text, not token ids, so a
  sequence is sent as text and refused unless that text tokenizes back to its exact ids.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoTokenizer

from causal_lm.sampling import Completion, SamplingOptions
from teacher_client.fingerprint import tokenizer_fingerprint
from teacher_service.backend_api import Capability, ScoredBatch, ScoreItem
from teacher_service.errors import ErrorKind, RequestError, ServiceError
from teacher_service.scoring import SequenceScores

log = logging.getLogger(__name__)


class UpstreamError(ServiceError):
    """The upstream server failed or answered something unusable."""

    kind = ErrorKind.UPSTREAM_FAILED


class RemoteBackend(ABC):
    """A backend_api.Backend whose scores and completions come from an upstream server."""

    name = "remote"
    capabilities: tuple[Capability, ...] = ()
    samples_while_scoring = False  # the upstream samples on its own, in its own forward
    device = "remote"
    model_dtype = "unknown"

    def __init__(self, upstream: str, tokenizer: Any, *, timeout: float = 300.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.http = httpx.Client(base_url=self.upstream, timeout=timeout)
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.bos_token_id = _id_or_minus_one(tokenizer.bos_token_id)
        self.eos_token_id = _id_or_minus_one(tokenizer.eos_token_id)
        self.pad_token_id = _id_or_minus_one(tokenizer.pad_token_id)
        self.eos_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
        self.model_id, self.max_seq_len = self._describe()

    @classmethod
    def connect(cls, upstream: str, tokenizer_dir: str | Path, timeout: float = 300.0):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(upstream, tokenizer, timeout=timeout)

    @abstractmethod
    def _describe(self) -> tuple[str, int]:
        """(model id, max sequence length), asked from the upstream."""

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            answer = self.http.post(path, json=body)
        except httpx.HTTPError as error:
            raise UpstreamError(f"{self.upstream}{path}: {error}") from None
        if answer.status_code in (400, 413, 422):
            raise RequestError(
                f"the upstream refused the request: {_message(answer)}",
                kind=ErrorKind.TOO_LARGE if answer.status_code == 413 else None,
            )
        if answer.status_code != 200:
            raise UpstreamError(
                f"{self.upstream}{path}: HTTP {answer.status_code}: {_message(answer)}"
            )
        return answer.json()

    def _get(self, path: str) -> Any:
        try:
            answer = self.http.get(path)
            answer.raise_for_status()
        except httpx.HTTPError as error:
            raise UpstreamError(f"{self.upstream}{path}: {error}") from None
        return answer.json()


class OpenAIBackend(RemoteBackend):
    """A vLLM / SGLang-style server with `prompt_logprobs` on /v1/completions."""

    name = "openai"
    capabilities = (Capability.TARGET, Capability.TOPK, Capability.RANKS, Capability.GENERATE)

    def _describe(self) -> tuple[str, int]:
        model = self._get("/v1/models")["data"][0]
        return model["id"], int(model.get("max_model_len") or self.tokenizer.model_max_length)

    def score_batch(self, items: list[ScoreItem]) -> ScoredBatch:
        """One upstream request for the whole batch (the upstream batches it again; what
        its forwards ran, padding included, is not ours to see)."""
        top_k = max(item.options.top_k for item in items)
        answer = self._post(
            "/v1/completions",
            {
                "model": self.model_id,
                "prompt": [item.token_ids.tolist() for item in items],
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": top_k,
            },
        )
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        scores = [
            _scores_from_prompt_logprobs(item, choice["prompt_logprobs"])
            for item, choice in zip(items, choices)
        ]
        return ScoredBatch(scores, forward_tokens=None)

    def generate(
        self, prompts: list[list[int]], options: SamplingOptions, generator: torch.Generator | None
    ) -> list[Completion]:
        """The upstream samples (its own random stream: `seed` is passed, `generator` is not)."""
        body = {
            "model": self.model_id,
            "prompt": prompts,
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "seed": options.seed,
            "ignore_eos": not options.stop_at_eos,
            "return_token_ids": True,
        }
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        completions = []
        for choice in choices:
            if choice.get("token_ids") is None:
                raise UpstreamError("the upstream did not return token_ids (return_token_ids)")
            ids = list(choice["token_ids"])
            ended = choice["finish_reason"] == "stop" and bool(ids) and ids[-1] in self.eos_ids
            completions.append(Completion(ids, "eos" if ended else "length"))
        return completions


class TGIBackend(RemoteBackend):
    """A text-generation-inference server: prefill log-probs of the actual tokens only."""

    name = "tgi"
    capabilities = (Capability.TARGET, Capability.GENERATE)

    def _describe(self) -> tuple[str, int]:
        info = self._get("/info")
        return info["model_id"], int(
            info.get("max_total_tokens") or self.tokenizer.model_max_length
        )

    def _text(self, ids: list[int], field: str) -> str:
        """The text TGI will tokenize back into exactly `ids` (it adds the special tokens)."""
        has_bos = bool(ids) and ids[0] == self.bos_token_id
        text = self.tokenizer.decode(ids[1:] if has_bos else ids)
        if list(self.tokenizer(text)["input_ids"]) != ids:
            raise RequestError(
                f"{field}: these token ids do not come back from their text, and the tgi "
                "backend can only send text (its upstream takes no token ids)",
                field=field,
            )
        return text

    def score_batch(self, items: list[ScoreItem]) -> ScoredBatch:
        """One upstream request per sequence (what its forwards ran is not ours to see)."""
        results = []
        for item in items:
            ids = item.token_ids.tolist()
            answer = self._post(
                "/generate",
                {
                    "inputs": self._text(ids, item.field),
                    "parameters": {
                        "max_new_tokens": 1,
                        "details": True,
                        "decoder_input_details": True,
                    },
                },
            )
            prefill = answer["details"]["prefill"]
            if [token["id"] for token in prefill] != ids:
                raise UpstreamError("the upstream tokenized the sequence differently")
            target = torch.tensor([token["logprob"] for token in prefill[item.score_from :]])
            results.append(_finish(item, target, None, None, None))
        return ScoredBatch(results, forward_tokens=None)

    def generate(
        self, prompts: list[list[int]], options: SamplingOptions, generator: torch.Generator | None
    ) -> list[Completion]:
        completions = []
        for n, prompt in enumerate(prompts):
            parameters: dict[str, Any] = {
                "max_new_tokens": options.max_new_tokens,
                "details": True,
                "seed": options.seed,
            }
            if options.temperature > 0:
                parameters.update(do_sample=True, temperature=options.temperature)
                if options.top_p < 1:
                    parameters["top_p"] = options.top_p
            answer = self._post(
                "/generate",
                {"inputs": self._text(prompt, f"prompts[{n}]"), "parameters": parameters},
            )
            details = answer["details"]
            ids = [token["id"] for token in details["tokens"]]
            reason = "eos" if details["finish_reason"] == "eos_token" else "length"
            completions.append(Completion(ids, reason))
        return completions


def _scores_from_prompt_logprobs(item: ScoreItem, positions: list[Any]) -> SequenceScores:
    """vLLM's prompt_logprobs (per position {token id: {logprob, rank}}) -> our rows."""
    ids = item.token_ids.tolist()
    k = item.options.top_k
    target, ranks, top_ids, top_logprobs = [], [], [], []
    for position in range(item.score_from, len(ids)):
        entries = {int(token): value for token, value in positions[position].items()}
        actual = entries[ids[position]]
        target.append(actual["logprob"])
        ranks.append(actual["rank"])
        best = sorted(entries.items(), key=lambda kv: kv[1]["rank"])[:k]
        if len(best) < k:
            raise UpstreamError(f"asked for the top {k}, the upstream returned {len(best)}")
        top_ids.append([token for token, _ in best])
        top_logprobs.append([value["logprob"] for _, value in best])
    return _finish(
        item,
        torch.tensor(target),
        torch.tensor(top_ids, dtype=torch.int32).view(-1, k) if k else None,
        torch.tensor(top_logprobs).view(-1, k) if k else None,
        torch.tensor(ranks, dtype=torch.int32) if item.options.ranks else None,
    )


def _finish(item: ScoreItem, target, topk_ids, topk_logprobs, ranks) -> SequenceScores:
    dtype = item.options.dtype
    return SequenceScores(
        target_logprobs=target.float().to(dtype),
        topk_ids=topk_ids,
        topk_logprobs=None if topk_logprobs is None else topk_logprobs.float().to(dtype),
        candidate_logprobs=None,
        full_logprobs=None,
        target_ranks=ranks,
    )


def _message(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


def _id_or_minus_one(token_id: int | None) -> int:
    return -1 if token_id is None else int(token_id)


BACKENDS = {"openai": OpenAIBackend, "tgi": TGIBackend}

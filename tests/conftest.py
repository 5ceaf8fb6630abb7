"""Shared fixtures: one tiny model per session, served in-process on a free loopback port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from distill_lab.tiny_model import TINY_STUDENT_SPEC, build_tiny_model
from teacher_client import TeacherClient
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.backend import HFBackend
from teacher_service.config import Limits, ServerConfig
from teacher_service.server import BackgroundServer

TEXTS = [
    "Ada has 12 apples.",
    "Ben finds 3 coins and gives them away to Cleo, so Cleo has 40.",
    "Dara sells 7 marbles.",
    "Emil has 815 tickets. Emil loses 9 of them to Fay, so Fay has 824.",
    "Gus counts 2 shells",
    "Hana buys 61 stamps and 4 books.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def student_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A smaller random model sharing the tiny teacher's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-student")
    return build_tiny_model(out, TINY_STUDENT_SPEC, tokenizer_from=tiny_model_dir)


@pytest.fixture(scope="session")
def backend(tiny_model_dir: Path) -> HFBackend:
    return HFBackend.load(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(backend: HFBackend):
    return backend.tokenizer


@pytest.fixture(scope="session")
def sequences(tokenizer) -> list[list[int]]:
    """Token ids of TEXTS: mixed lengths, each starting with <bos>."""
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def start_background_server(model_dir: Path, backend: HFBackend, **config) -> BackgroundServer:
    config.setdefault("limits", Limits())
    running = BackgroundServer(ServerConfig(model=str(model_dir), port=0, **config), backend)
    running.start()
    if isinstance(backend, GatedBackend):
        backend.entered.clear()  # the warm-up's forwards went through it
    return running


def busy_limits(sequences: list[list[int]]) -> Limits:
    """Forwards of one of `sequences` at most, and a queue that admits nothing past the next
    forward: once a call holds the worker and one with all of them waits, every further
    call is refused (at once, with a retry hint)."""
    return Limits(max_queue_forwards=1e-9, max_batch_tokens=max(map(len, sequences)))


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, backend: HFBackend) -> Iterator[BackgroundServer]:
    running = start_background_server(tiny_model_dir, backend, max_wait_ms=2.0, http_port=0)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def http_url(server: BackgroundServer) -> str:
    """http://127.0.0.1:PORT of the same server's HTTP front end (same engine and batcher)."""
    return server.http_url


@pytest.fixture(scope="session")
def client(server: BackgroundServer) -> Iterator[TeacherClient]:
    with TeacherClient(server.address, timeout=60) as teacher:
        yield teacher


@pytest.fixture(scope="session")
def stub(server: BackgroundServer) -> Iterator[pb_grpc.TeacherStub]:
    """The raw generated stub, for requests the client library would refuse to build."""
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.TeacherStub(channel)
    channel.close()


def reference_logprobs(
    backend: HFBackend, token_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """Independent computation: one unpadded forward of the whole sequence in this process.

    Row i is the distribution over token i + 1 given tokens [0, i], over the real vocabulary.
    """
    with torch.inference_mode():
        logits = backend.model(torch.tensor([token_ids])).logits[0, :, : backend.vocab_size]
    return torch.log_softmax(logits.double() / temperature, dim=-1).float()


def soft_capped_gemma2(vocab_size: int, layers: int) -> Gemma2ForCausalLM:
    """A tiny Gemma 2 (eval mode) whose logits reach far beyond its final soft cap of 3, so
    the cap changes every logit: what the rows paths must reproduce after the output layer."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,
        pad_token_id=0,
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model


class GatedBackend:
    """The real backend, except that a forward (a score batch `holds` picks, by default
    every one, or a chunk of Generate's prompts) waits for `gate` while it is closed;
    `entered` says one is waiting, `generate_calls` counts Generate's chunks."""

    def __init__(self, backend, holds: Callable[[list], bool] | None = None, *, open=True):
        self._backend = backend
        self._holds = holds or (lambda items: True)
        self.gate = threading.Event()
        if open:
            self.gate.set()
        self.entered = threading.Event()
        self.generate_calls = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _wait(self) -> None:
        self.entered.set()
        self.gate.wait(timeout=30)

    def score_batch(self, items):
        if self._holds(items):
            self._wait()
        return self._backend.score_batch(items)

    def generate(self, prompts, options, generator):
        self.generate_calls += 1
        self._wait()
        return self._backend.generate(prompts, options, generator)

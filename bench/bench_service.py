"""Benchmark the teacher service against its physical limit, the model's forward pass.

Run it from the repository root (`make bench` does):

    .venv/bin/python bench/bench_service.py            # ~4-5 minutes on 2 CPU cores
    .venv/bin/python bench/bench_service.py --quick    # ~70 s, smaller shapes, 2 rounds
    .venv/bin/python bench/bench_service.py --shapes prompt-heavy,groups   # some sections
    .venv/bin/python bench/bench_service.py --model DIR --device cuda --json out.json
    bench/gpu.sh                                       # every GPU measurement (results/gpu/)

It checks the performance targets of docs/design.md ("Performance targets"), in three
sections (`--shapes`, default all of them):

base: the first-wave measurements, on the benchmark model (12.5M, vocabulary 4000).
1. Throughput. Tokens scored per second through the service, against an in-process
   forward of the same model on the same batch (`model(input_ids).logits` under
   torch.inference_mode), every position scored (score_from = 1). The forward is the
   physical limit, so the ratio is the cost of everything else: validation, batching, the
   scoring math, encoding, gRPC, decoding. Target: >= 0.85. Two more in-process baselines
   against the same forward: the forward plus the scoring math on its logits
   (log-softmax, targets and top-k: teacher_service.scoring.score_chunked over the batch's
   rows, in the backend's chunks, results on the host; target >= 0.9), and the backend's
   own score_batch (what the server's model worker runs: the body, the output layer on the
   scored rows, the math, the host copy), so the table shows how much of the gap is math
   and how much is the service.
2. Batching. 8 client threads each sending small requests (1 sequence of 32 tokens) one
   after another, against one client sending the same requests alone. The dynamic batcher
   should merge concurrent requests into shared forwards. Target: >= 3x. For reference,
   the table also shows what batching buys inside the model: the backend's score_batch on
   the same sequences 8 at a time against 1 at a time, in process (no service at all).
3. Wire. Serialized ScoreResponse bytes per scored token at top_k = 64 in float16. The
   floor is 2 + 64 * (4 + 2) = 386 bytes (target, top-k ids, top-k log-probs).
   Target: <= 420.

prompt-heavy: what trainers send. Sequences of a 384-token prompt and a 128-token
completion, scored from the completion (score_from = 384), top_k 64, on a model with a
32k vocabulary (`--ph-model`, default v32000-h256-l4: hidden 256, 4 layers). The service
on today's path (`serve --full-logits`: `model(...).logits` over every position) against
the service on the new path (the body over every position, the output layer on the scored
rows only). Target: >= 1.7x. And the new path against the physical limit measured in the
same run, in process: the model body's forward (`model.get_decoder()`), the output layer
on the scored rows only, log-softmax and top-k, cast to float16 and on the host. Target:
>= 0.85x. `--old-tree DIR` runs today's-path server from another source tree instead
(e.g. `git archive <commit> | tar -x -C DIR`), for a checkout before the new path.

groups: on-policy trainers send n samples of one prompt (GRPO/TRL/verl-style). Groups of
`--samples` (8) sequences sharing a 384-token prompt, each with its own 128-token
completion, scored from the completion; `--groups` prompts per request (one request per
trainer batch; `--group-request group` sends one request per group instead). The service
with prompt sharing (each prompt's forward runs once, the completions against its KV
cache) against the same sequences with `serve --no-share-prefixes`. Target: >= 2.5x. The
section also reports the tokens each variant's forwards computed (padding included) over
the tokens the sequences hold, from score_batch's `forward_tokens` in process and from the
server's /metrics. The model is the base section's (`--group-model`, default base): sharing
saves the prompt's body forward, not the output layer over the completions, so the gain
is bounded by the body's share of the cost, as in real teachers (a 7B model with a 152k
vocabulary spends under a tenth of its FLOPs in the output layer). A hidden-256 model with
a 32k vocabulary spends most of them there, and no sharing could make it 2.5x faster.

mixed: sequences that share nothing, of mixed lengths (`--mixed-batch` (32) sequences of
`--mixed-min` (16) to prompt-len + completion-len tokens) in one request, every position
scored, on the groups' model. The service packing several short sequences into one row
against `serve --no-packing` (every row padded to the longest), and the same in process,
with the padding fraction of what each forward computed. No target: the issue asks for
the padding fraction before and after.

A model argument (`--model`, `--ph-model`, `--group-model`) is `base` (the base section's
model), a spec `vVOCAB-hHIDDEN-lLAYERS` or a preset (`qwen2-0.5b`: Qwen2-0.5B's shape, a
152k vocabulary; `qwen2-tiny`: its vocabulary on a tiny body), each a random-weight Llama
built once under .cache/, or a local model directory.

Each server runs as a separate process, started exactly as a user starts it
(`python -m teacher_service serve ...`), one per variant: a section starts its servers
together and stops them when it is done; the in-process baselines run in this process
while the servers are idle. These machines are noisy, so each section alternates its
baseline and service measurements for several rounds and the table reports medians (with
each round's values and the spread, so a noisy run can be recognized and rerun). A variant
the server does not offer (`serve --help` lacks its flag) is skipped and named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch
from transformers.utils import logging as hf_logging

import teacher_client
from causal_lm.placement import resolve_device
from distill_lab.tiny_model import TinyModelSpec, build_tiny_model
from teacher_client import TeacherClient, TeacherServiceError, build_score_request
from teacher_client.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.backend import HFBackend, ScoreItem
from teacher_service.backend_api import ForwardTokens
from teacher_service.cli import free_port
from teacher_service.scoring import HALF_DTYPES, ScoreOptions, score_chunked

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_TARGET = 0.85  # service tokens/s over in-process forward tokens/s
SCORING_TARGET = 0.9  # in-process forward + scoring math over the forward alone
BATCHING_TARGET = 3.0  # concurrent clients over one client, sequences/s
WIRE_TARGET = 420.0  # bytes per scored token at top_k = 64, float16
PROMPT_HEAVY_TARGET = 1.7  # new path over today's path (the first-wave service)
LIMIT_TARGET = 0.85  # new path over the in-process body + scored rows' head + top-k
GROUPS_TARGET = 2.5  # shared prompts over the same sequences unshared
NOISY_SPREAD = 0.5  # (max - min) / median over rounds above which the run is flagged
SHAPES = ("base", "prompt-heavy", "groups", "mixed")
MODEL_SPEC = re.compile(r"^v(\d+)-h(\d+)-l(\d+)$")
# named shapes, random weights built by ensure_bench_model (a model argument names them)
PRESETS = {
    # Qwen2-0.5B's shape: a 152k vocabulary, tied embeddings (about 494M parameters; as
    # a Llama, without Qwen2's q/k/v biases)
    "qwen2-0.5b": TinyModelSpec(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        max_seq_len=2048,
        init_std=0.02,
        tie_word_embeddings=True,
    ),
    # the same vocabulary and tying at a size for CPU dry runs (bench/gpu.sh)
    "qwen2-tiny": TinyModelSpec(
        vocab_size=151_936,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        max_seq_len=2048,
        init_std=0.02,
        tie_word_embeddings=True,
    ),
}

# --- the benchmark models --------------------------------------------------------------------


def bench_spec(args: argparse.Namespace) -> TinyModelSpec:
    """The base model of --vocab-size, --hidden-size and --layers (bench_http.py uses it too)."""
    return model_spec(args.vocab_size, args.hidden_size, args.layers)


def model_spec(vocab_size: int, hidden_size: int, layers: int) -> TinyModelSpec:
    return TinyModelSpec(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 64 * 64,  # Llama's ~8/3, rounded
        num_layers=layers,
        num_heads=hidden_size // 64,
        num_kv_heads=2,
        max_seq_len=2048,
        init_std=0.02,
    )


def ensure_bench_model(spec: TinyModelSpec, name: str | None = None) -> Path:
    """The cached benchmark model under .cache/ (bench-model-NAME, by default the spec's
    vVOCAB-hHIDDEN-lLAYERS), built on first use.

    build_tiny_model's BPE runs out of merges on its small synthetic corpus (about 1.4k
    tokens whatever vocab_size asks for), so the vocabulary is topped up with plain added
    tokens and the embeddings resized: the lm_head and the scoring math grow with it.
    """
    name = "bench-model-" + (name or f"v{spec.vocab_size}-h{spec.hidden_size}-l{spec.num_layers}")
    out = ROOT / ".cache" / name
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"building the benchmark model in {out} ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".", dir=out.parent))
    build_tiny_model(tmp, spec)
    tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    missing = spec.vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(missing)])
        model = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True)
        padded = (len(tokenizer) // 64 + 1) * 64  # padded past the vocabulary, as built
        model.resize_token_embeddings(padded, mean_resizing=False)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve_model(value: str, args: argparse.Namespace | None = None) -> Path:
    """A model argument: `base` (--model, or the model of --vocab-size, --hidden-size and
    --layers), a preset (PRESETS), a spec vVOCAB-hHIDDEN-lLAYERS, or a model directory."""
    if value == "base" and args is not None:
        if not args.model:
            return ensure_bench_model(bench_spec(args))
        value = args.model
    if value in PRESETS:
        return ensure_bench_model(PRESETS[value], value)
    match = MODEL_SPEC.match(value)
    if match:
        return ensure_bench_model(model_spec(*(int(g) for g in match.groups())))
    if not (Path(value) / "config.json").is_file():
        sys.exit(
            f"bench: {value!r} is neither base, a preset ({', '.join(PRESETS)}), a spec like "
            "v32000-h256-l4, nor a model dir"
        )
    return Path(value)


class Backends:
    """The in-process backends, one per model directory (a GPU holds one copy of each)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loaded: dict[Path, HFBackend] = {}

    def get(self, model_dir: Path) -> HFBackend:
        key = model_dir.resolve()
        if key not in self.loaded:
            self.loaded[key] = HFBackend.load(
                model_dir, device=self.args.device, dtype=self.args.dtype
            )
        return self.loaded[key]


def describe_model(model_dir: Path, backend: HFBackend) -> str:
    params = sum(p.numel() for p in backend.model.parameters())
    size = f"{params / 1e6:.1f}M params, vocab {backend.vocab_size}, {backend.model_dtype}"
    return f"{model_dir} ({size})"


# --- the server processes --------------------------------------------------------------------


def server_memory(pid: int) -> dict[str, float | None]:
    """The server's peak resident memory (Linux /proc) and its GPU memory (nvidia-smi: what
    the process holds now, the CUDA allocator's cache included)."""
    rss = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
    gpu = None
    try:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
        for line in subprocess.run(query, capture_output=True, text=True).stdout.splitlines():
            found, used = (part.strip() for part in line.split(","))
            if int(found) == pid:
                gpu = float(used.split()[0])
    except (OSError, ValueError):
        pass
    return {"rss_peak_mib": rss, "gpu_mib": gpu}


def server_flags(env: dict[str, str], cwd: Path = ROOT) -> set[str]:
    """The flags `teacher-service serve` knows (from its --help), to skip variants it lacks."""
    command = [sys.executable, "-m", "teacher_service", "serve", "--help"]
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


def tree_env(env: dict[str, str], tree: Path | None) -> dict[str, str]:
    """The environment for a server run from another source tree (first on sys.path)."""
    if tree is None:
        return env
    paths = [str(tree), str(tree / "teacher-client")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    return env | {"PYTHONPATH": os.pathsep.join(paths)}


def scrape_metrics(http_port: int | None) -> dict[str, float] | None:
    """The server's /metrics: its counters of tokens and its padding-fraction histogram."""
    if http_port is None:
        return None
    try:
        url = f"http://127.0.0.1:{http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        wanted = "token" in name or name.startswith("teacher_batch_padding_fraction_")
        if name.startswith("teacher_") and wanted and not name.endswith(("_bucket", "_created")):
            found[name] = float(value)
    return found


@dataclass
class ServerProcess:
    """`python -m teacher_service serve ...` as a child process, its output in a log file."""

    command: list[str]
    address: str
    log_path: Path
    cwd: Path = ROOT
    http_port: int | None = None  # where its /metrics are, if it serves HTTP
    process: subprocess.Popen | None = None

    def launch(self, env: dict[str, str]) -> None:
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with TeacherClient(self.address) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    raise RuntimeError(f"the server exited ({code}):\n{self.tail()}")
                try:
                    client.wait_until_serving(timeout=2.0)
                    return
                except (TimeoutError, TeacherServiceError):
                    continue
        raise TimeoutError(f"the server did not report SERVING in {timeout}s:\n{self.tail()}")

    def start(self, env: dict[str, str], timeout: float = 300.0) -> None:
        self.launch(env)
        self.wait_serving(timeout)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def server_process(
    args: argparse.Namespace,
    model_dir: Path,
    max_batch_tokens: int,
    extra: list[str] | None = None,
    tree: Path | None = None,
    metrics: bool = False,
) -> ServerProcess:
    """A server for one variant, on a free port (and HTTP on another for /metrics)."""
    port = free_port()
    command = [sys.executable, "-m", "teacher_service", "serve", "--model", str(model_dir)]
    command += ["--port", str(port), "--device", args.device, "--dtype", args.dtype]
    if args.max_wait_ms is not None:
        command += ["--max-wait-ms", f"{args.max_wait_ms:g}"]
    command += ["--max-batch-tokens", str(max_batch_tokens)]
    http_port = None
    if metrics:
        http_port = free_port()
        command += ["--http-port", str(http_port)]
    command += extra or []
    log_path = Path(tempfile.gettempdir()) / f"bench-teacher-server-{port}.log"
    return ServerProcess(command, f"127.0.0.1:{port}", log_path, tree or ROOT, http_port)


def start_all(servers: list[ServerProcess], envs: list[dict[str, str]]) -> None:
    """Launch the servers together (their loads overlap), then wait for each to serve."""
    for server, env in zip(servers, envs, strict=True):
        server.launch(env)
    for server in servers:
        server.wait_serving()


def stop_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.stop()


# --- what is timed ---------------------------------------------------------------------------
# Each function returns a closure that does one measurement's work; the sections time them.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_process_forward(backend: HFBackend, input_ids: torch.Tensor, reps: int) -> Callable:
    """`model(input_ids).logits`, reps times: the physical limit when every row is scored."""

    @torch.inference_mode()
    def run() -> None:
        for _ in range(reps):
            backend.model(input_ids).logits  # noqa: B018 (the forward is the point)
        sync(backend.device)

    return run


def in_process_scoring(
    backend: HFBackend, input_ids: torch.Tensor, targets: torch.Tensor, top_k: int, reps: int
) -> Callable:
    """The forward plus the scoring math on its logits, reps times: every row of the batch
    scored together (score_chunked, in the backend's chunks, as score_batch scores a group),
    the results in float16 on the host, one synchronisation per batch."""
    options = ScoreOptions(top_k=top_k, dtype=torch.float16)
    flat = targets.reshape(-1)

    @torch.inference_mode()
    def run() -> None:
        for _ in range(reps):
            logits = backend.model(input_ids).logits
            scores = score_chunked(
                logits.view(-1, logits.shape[-1]),
                flat,
                backend.vocab_size,
                options,
                None,
                project=None,
                chunk_rows=backend.chunk_rows,
            )
            for t in (scores.target_logprobs, scores.topk_logprobs, scores.topk_ids):
                t.to("cpu", non_blocking=True)
        sync(backend.device)

    return run


def in_process_rows_limit(
    backend: HFBackend, batch: torch.Tensor, score_from: int, top_k: int, reps: int
) -> Callable:
    """The physical limit when only rows score_from - 1 .. L - 2 are scored, reps times:
    the model body over the batch, the output layer on the scored rows' hidden states only
    (its first V rows: padded rows never computed), log-softmax in float32, the targets'
    log-probs and the top-k (read from the logits in the model's dtype, as score_rows does),
    the results in float16 on the host."""
    model = backend.model
    decoder = model.get_decoder()
    head = model.get_output_embeddings().weight[: backend.vocab_size]  # [V, H]
    length = batch.shape[1]
    input_ids = batch[:, :-1].to(backend.device)
    attention_mask = torch.ones_like(input_ids)
    targets = batch[:, score_from:].reshape(-1, 1).to(backend.device)

    @torch.inference_mode()
    def run() -> None:
        for _ in range(reps):
            hidden = decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            rows = hidden[:, score_from - 1 : length - 1].reshape(-1, hidden.shape[-1])
            logits = torch.nn.functional.linear(rows, head)  # [N, V]
            logprobs = logits.log_softmax(-1, dtype=torch.float32)
            order = logits if logits.dtype in HALF_DTYPES else logprobs
            target = logprobs.gather(1, targets)
            top_ids = order.topk(top_k, dim=-1).indices
            top_logprobs = logprobs.gather(1, top_ids)
            for t in (target.half(), top_logprobs.half(), top_ids.int()):
                t.cpu()
        sync(backend.device)

    return run


def in_process_batches(
    backend: HFBackend,
    sequences: list[list[int]],
    batch_size: int,
    top_k: int,
    score_from: int = 1,
    switches: dict[str, bool] | None = None,
) -> Callable:
    """The backend's score_batch (what the server's model worker runs) over the sequences,
    batch_size at a time: what batching buys inside the model, with no service around it.
    switches: the backend's attributes set for these calls (share_prefixes, pack). A call
    returns what each batch's forwards ran."""
    options = ScoreOptions(top_k=top_k, dtype=torch.float16)
    items = [ScoreItem(torch.tensor(s), score_from, options) for s in sequences]
    switches = switches or {}

    def run() -> list[ForwardTokens]:
        saved = {name: getattr(backend, name) for name in switches}
        vars(backend).update(switches)
        try:
            return [
                backend.score_batch(items[start : start + batch_size]).forward_tokens
                for start in range(0, len(items), batch_size)
            ]
        finally:
            vars(backend).update(saved)

    return run


def through_service(
    client: TeacherClient,
    sequences: list[list[int]],
    top_k: int,
    reps: int,
    window: int,
    score_from: int = 1,
    per_request: int | None = None,
) -> Callable:
    """The same batch, reps times, pipelined over one ScoreStream (`window` requests in
    flight), so one batch's encoding, transfer and decoding overlap the next one's forward.
    per_request splits the batch into requests of that many sequences (default: one)."""
    size = per_request or len(sequences)
    calls = [
        {"sequences": sequences[n : n + size], "score_from": score_from, "top_k": top_k}
        | {"dtype": "float16"}
        for n in range(0, len(sequences), size)
    ]

    def run() -> None:
        answers = list(client.score_stream(calls * reps, window=window))
        assert len(answers) == reps * len(calls) and len(answers[-1]) == len(calls[-1]["sequences"])

    return run


def small_requests(
    clients: list[TeacherClient], sequences: list[list[int]], top_k: int
) -> Callable:
    """Each client, on a thread of its own, scores its share of the sequences one request
    (of one sequence) after another."""

    def run() -> None:
        errors: list[BaseException] = []

        def send(client: TeacherClient, share: list[list[int]]) -> None:
            try:
                for sequence in share:
                    client.score([sequence], 1, top_k=top_k, dtype="float16")
            except BaseException as error:
                errors.append(error)

        shares = [sequences[n :: len(clients)] for n in range(len(clients))]
        threads = [
            threading.Thread(target=send, args=pair) for pair in zip(clients, shares, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    return run


def wire_bytes_per_token(address: str, sequences: list[list[int]], top_k: int) -> float:
    """Serialized ScoreResponse size over scored tokens (score_from = 1: all but the first)."""
    score_options = teacher_client.ScoreOptions(top_k=top_k, dtype="float16")
    request = build_score_request(sequences, 1, score_options)
    options = [("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(address, options=options) as channel:
        response = pb_grpc.TeacherStub(channel).Score(request, timeout=600)
    scored = sum(len(s) - 1 for s in sequences)
    return len(response.SerializeToString()) / scored


def run_rounds(
    timed: dict[str, tuple[Callable, float]], rounds: int, label: str
) -> dict[str, list[float]]:
    """Every round runs every closure once, in order; returns work units per second."""
    runs: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(rounds):
        for name, (fn, work) in timed.items():
            start = time.perf_counter()
            fn()
            runs[name].append(work / (time.perf_counter() - start))
        print(
            f"{label} round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in runs.items()),
            flush=True,
        )
    return runs


def computed_tokens(items_run: Callable, sequences: list[list[int]]) -> dict:
    """What one run of in_process_batches over `sequences` ran, as its score_batch calls
    returned it (backend_api.ForwardTokens: padding included, a shared prefix once)."""
    real = sum(len(s) - 1 for s in sequences)  # forward_len: the last token is only a target
    ran = items_run()
    computed, padding = sum(t.computed for t in ran), sum(t.padding for t in ran)
    return {
        "real_tokens": real,
        "computed_tokens": computed,
        "padding_tokens": padding,
        "computed_fraction": computed / real,
        "padding_fraction": padding / computed,
    }


# --- results ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    name: str
    unit: str
    rounds: list[float]  # one value per round (a single one for the wire size)
    baseline: str | None = None  # the measurement the ratio is taken against
    target: float | None = None  # on the ratio when there is a baseline, else on the value
    higher_is_better: bool = True
    ratio: float | None = None
    passed: bool | None = None
    all_tokens_per_scored: float | None = None  # tokens the sequences hold per scored token

    @property
    def value(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds: how noisy this measurement was."""
        return (max(self.rounds) - min(self.rounds)) / self.value


@dataclass
class Section:
    """What one section measured, and what it has to say after the table."""

    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def judge(measurements: list[Measurement]) -> None:
    by_name = {m.name: m for m in measurements}
    for m in measurements:
        if m.baseline is not None:
            m.ratio = m.value / by_name[m.baseline].value
        if m.target is not None:
            score = m.value if m.ratio is None else m.ratio
            m.passed = score >= m.target if m.higher_is_better else score <= m.target


def print_table(measurements: list[Measurement]) -> None:
    header = (
        f"{'measurement':<62} {'median':>10} {'unit':<6} {'spread':>6} "
        f"{'ratio':>6} {'target':>7}  result"
    )
    print(header)
    print("-" * len(header))
    for m in measurements:
        spread = f"{m.spread:.0%}" if len(m.rounds) > 1 else ""
        ratio = "" if m.ratio is None else f"{m.ratio:.2f}"
        target = "" if m.target is None else f"{'>=' if m.higher_is_better else '<='} {m.target:g}"
        result = "" if m.passed is None else ("PASS" if m.passed else "FAIL")
        total = ""
        if m.all_tokens_per_scored is not None:
            total = f"{'':4}{m.value * m.all_tokens_per_scored:>12,.0f} all tok/s"
        print(
            f"{m.name:<62} {m.value:>10,.1f} {m.unit:<6} {spread:>6} {ratio:>6} {target:>7}"
            f"  {result:<4}{total}".rstrip()
        )


def cuda_peak_mib(device: torch.device) -> float | None:
    """This process's peak CUDA allocation since the last reset (None off CUDA)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def memory_line(name: str, memory: dict[str, float | None]) -> str:
    rss, gpu = memory["rss_peak_mib"], memory["gpu_mib"]
    text = f"{name}: peak RSS {rss:,.0f} MiB" if rss is not None else f"{name}: RSS unknown"
    return text + (f", GPU {gpu:,.0f} MiB (nvidia-smi)" if gpu is not None else "")


# --- the sections ----------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    backends: Backends
    env: dict[str, str]  # the servers' environment
    flags: set[str]  # what `serve` offers in this tree


def run_base(ctx: Context) -> Section:
    """Throughput (every row scored), batching of small requests, bytes on the wire."""
    args = ctx.args
    model_dir = resolve_model("base", args)
    backend = ctx.backends.get(model_dir)
    device, vocab = backend.device, backend.vocab_size

    # throughput: one batch; score_from = 1, so every forward position is a scored token
    batch = torch.randint(
        0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    input_ids, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
    sequences = batch.tolist()
    scored_per_measurement = args.reps * input_ids.numel()
    # batching: clients x small_requests single-sequence requests, the same ones for both
    n_small = args.clients * args.small_requests
    small = torch.randint(
        0, vocab, (n_small, args.small_len), generator=torch.Generator().manual_seed(1)
    ).tolist()

    max_batch_tokens = args.max_batch_tokens or args.batch_size * (args.seq_len - 1)
    server = server_process(args, model_dir, max_batch_tokens)
    print(f"== base: {describe_model(model_dir, backend)}")
    print(
        f"throughput:    batch {args.batch_size} x {args.seq_len} tokens "
        f"({input_ids.numel()} scored), "
        f"{args.reps} batches per measurement, ScoreStream window {args.window}, "
        f"top_k {args.top_k}, float16"
    )
    print(
        f"batching:      {args.clients} clients x {args.small_requests} requests of 1 x "
        f"{args.small_len} tokens, vs 1 client sending all {n_small}"
    )
    print(f"server:        {shlex.join(server.command)}")
    print(f"server log:    {server.log_path}", flush=True)

    cuda_peak_mib(device)
    try:
        server.start(ctx.env)
        client = TeacherClient(server.address, timeout=600)
        clients = [TeacherClient(server.address, timeout=600) for _ in range(args.clients)]
        c = args.clients
        # the model worker's path on the same batch: one score_batch of every sequence
        whole = in_process_batches(backend, sequences, len(sequences), args.top_k)
        timed = {  # name -> (closure, work); every round runs them all, in this order
            "forward": (in_process_forward(backend, input_ids, args.reps), scored_per_measurement),
            "service": (
                through_service(client, sequences, args.top_k, args.reps, args.window),
                scored_per_measurement,
            ),
            "forward+score": (
                in_process_scoring(backend, input_ids, targets, args.top_k, args.reps),
                scored_per_measurement,
            ),
            "score_batch": (
                lambda: [whole() for _ in range(args.reps)],
                scored_per_measurement,
            ),
            "1 client": (small_requests(clients[:1], small, args.top_k), n_small),
            f"{c} clients": (small_requests(clients, small, args.top_k), n_small),
            "in-process 1": (in_process_batches(backend, small, 1, args.top_k), n_small),
            f"in-process {c}": (in_process_batches(backend, small, c, args.top_k), n_small),
        }
        # warm up both sides: first forwards allocate, first calls connect
        in_process_forward(backend, input_ids, 1)()
        in_process_scoring(backend, input_ids, targets, args.top_k, 1)()
        whole()
        through_service(client, sequences, args.top_k, 1, 1)()
        small_requests(clients, small[: 2 * args.clients], args.top_k)()
        runs = run_rounds(timed, args.rounds, "base")
        wire_batch = wire_bytes_per_token(server.address, sequences, args.top_k)
        wire_small = wire_bytes_per_token(server.address, small[:1], args.top_k)
        memory = server_memory(server.process.pid)
    finally:
        server.stop()
    peak = cuda_peak_mib(device)

    shape = f"{args.batch_size} x {args.seq_len}"
    forward = f"throughput: in-process forward, {shape}"
    measurements = [
        Measurement(forward, "tok/s", runs["forward"]),
        Measurement(
            "throughput: in-process forward + scoring math",
            "tok/s",
            runs["forward+score"],
            baseline=forward,
            target=SCORING_TARGET,
        ),
        Measurement(
            "throughput: in-process score_batch (the model worker)",
            "tok/s",
            runs["score_batch"],
            baseline=forward,
        ),
        Measurement(
            f"throughput: service, ScoreStream window {args.window}",
            "tok/s",
            runs["service"],
            baseline=forward,
            target=THROUGHPUT_TARGET,
        ),
        Measurement("batching: service, 1 client", "seq/s", runs["1 client"]),
        Measurement(
            f"batching: service, {c} concurrent clients",
            "seq/s",
            runs[f"{c} clients"],
            baseline="batching: service, 1 client",
            target=BATCHING_TARGET,
        ),
        Measurement("batching (ref): in-process score_batch of 1", "seq/s", runs["in-process 1"]),
        Measurement(
            f"batching (ref): in-process score_batch of {c}",
            "seq/s",
            runs[f"in-process {c}"],
            baseline="batching (ref): in-process score_batch of 1",
        ),
        Measurement(
            f"wire: ScoreResponse bytes/token, {shape}",
            "B",
            [wire_batch],
            target=WIRE_TARGET,
            higher_is_better=False,
        ),
        Measurement(
            f"wire: ScoreResponse bytes/token, 1 x {args.small_len}",
            "B",
            [wire_small],
            target=WIRE_TARGET,
            higher_is_better=False,
        ),
    ]
    median = {name: statistics.median(values) for name, values in runs.items()}
    service_overhead = median["service"] / median["forward+score"]
    service_over_worker = median["service"] / median["score_batch"]
    batching_recovered = median[f"{c} clients"] / median[f"in-process {c}"]
    notes = [
        f"service / in-process forward + scoring math: {service_overhead:.2f}; service / "
        f"in-process score_batch: {service_over_worker:.2f} (what the service itself costs; "
        "the rest of the throughput gap is the scoring math)",
        f"service, {c} clients / in-process score_batch of {c}: {batching_recovered:.2f} (how "
        "much of the model's own batching gain the batcher recovers across clients)",
        memory_line("server memory", memory)
        + " (what one replica of this model needs, for sizing)",
    ]
    if peak is not None:
        notes.append(f"in-process CUDA peak allocation (base section): {peak:,.0f} MiB")
    params = sum(p.numel() for p in backend.model.parameters())
    report = {  # the keys of the first-wave report, kept at the top level of the JSON
        "server_command": shlex.join(server.command),
        "model": str(model_dir),
        "params": params,
        "vocab_size": vocab,
        "service_over_forward_and_score": service_overhead,
        "service_over_score_batch": service_over_worker,
        "clients_over_in_process_batch": batching_recovered,
        "server_memory_mib": memory,
        "cuda_peak_mib": peak,
    }
    return Section(measurements, notes, [], report)


def run_prompt_heavy(ctx: Context) -> Section:
    """Prompt + completion scored from the completion: today's path, the new path, the limit."""
    args = ctx.args
    model_dir = resolve_model(args.ph_model, args)
    backend = ctx.backends.get(model_dir)
    device, vocab = backend.device, backend.vocab_size
    prompt, completion = args.prompt_len, args.completion_len
    length, score_from = prompt + completion, prompt
    batch = torch.randint(
        0, vocab, (args.ph_batch, length), generator=torch.Generator().manual_seed(2)
    )
    sequences = batch.tolist()
    scored = args.shape_reps * args.ph_batch * completion
    all_per_scored = length / completion
    max_batch_tokens = args.ph_batch * (length - 1)  # one request, one forward

    section = Section()
    variants: dict[str, tuple[ServerProcess, dict[str, str]]] = {}
    if args.old_tree is not None:
        old_flags = server_flags(tree_env(ctx.env, args.old_tree), args.old_tree)
        old_extra = ["--full-logits"] if "--full-logits" in old_flags else []
        variants["old"] = (
            server_process(args, model_dir, max_batch_tokens, old_extra, args.old_tree, True),
            tree_env(ctx.env, args.old_tree),
        )
        old_label = f"today's path (--old-tree {args.old_tree})"
    elif "--full-logits" in ctx.flags:
        variants["old"] = (
            server_process(args, model_dir, max_batch_tokens, ["--full-logits"], metrics=True),
            ctx.env,
        )
        old_label = "today's path (--full-logits)"
    else:  # a tree before the new path: its plain server is today's path
        variants["old"] = (server_process(args, model_dir, max_batch_tokens, metrics=True), ctx.env)
        old_label = "today's path (this tree has no other)"
    if "--full-logits" in ctx.flags:
        variants["new"] = (server_process(args, model_dir, max_batch_tokens, metrics=True), ctx.env)
    else:
        section.skipped.append(
            "prompt-heavy: service, scored rows only (this tree's `serve` has no --full-logits, "
            "so it has no new path to compare)"
        )
    rows_only = getattr(backend, "rows_only", None)

    print(f"\n== prompt-heavy: {describe_model(model_dir, backend)}")
    print(
        f"shape:         batch {args.ph_batch} x ({prompt} prompt + {completion} completion), "
        f"score_from {score_from} ({args.ph_batch * completion} scored of "
        f"{args.ph_batch * length} tokens), {args.shape_reps} batches per measurement, "
        f"ScoreStream window {args.window}, top_k {args.top_k}, float16"
    )
    for name, (server, _) in variants.items():
        print(f"server ({name}):  {shlex.join(server.command)}  [cwd {server.cwd}]")
        print(f"server log:    {server.log_path}")
    sys.stdout.flush()

    servers = [server for server, _ in variants.values()]
    cuda_peak_mib(device)
    try:
        start_all(servers, [env for _, env in variants.values()])
        clients = {
            name: TeacherClient(server.address, timeout=600)
            for name, (server, _) in variants.items()
        }
        timed: dict[str, tuple[Callable, float]] = {
            "limit": (
                in_process_rows_limit(backend, batch, score_from, args.top_k, args.shape_reps),
                scored,
            )
        }
        for name, client in clients.items():
            fn = through_service(
                client, sequences, args.top_k, args.shape_reps, args.window, score_from
            )
            timed[name] = (fn, scored)
        if rows_only:
            ref = in_process_batches(backend, sequences, args.ph_batch, args.top_k, score_from)
            timed["score_batch"] = (lambda: [ref() for _ in range(args.shape_reps)], scored)
        for client in clients.values():  # warm up: first calls connect and allocate
            through_service(client, sequences, args.top_k, 1, 1, score_from)()
        in_process_rows_limit(backend, batch, score_from, args.top_k, 1)()
        runs = run_rounds(timed, args.rounds, "prompt-heavy")
        memory = {name: server_memory(server.process.pid) for name, (server, _) in variants.items()}
        metrics = {name: scrape_metrics(server.http_port) for name, (server, _) in variants.items()}
    finally:
        stop_all(servers)
    peak = cuda_peak_mib(device)

    shape = f"{args.ph_batch} x ({prompt}+{completion})"
    limit = f"prompt-heavy: in-process limit, {shape}"
    old = f"prompt-heavy: service, {old_label}"
    m = section.measurements
    m.append(Measurement(limit, "tok/s", runs["limit"], all_tokens_per_scored=all_per_scored))
    m.append(
        Measurement(old, "tok/s", runs["old"], baseline=limit, all_tokens_per_scored=all_per_scored)
    )
    if "new" in runs:
        for baseline, target, against in (
            (old, PROMPT_HEAVY_TARGET, "today's"),
            (limit, LIMIT_TARGET, "the limit"),
        ):
            m.append(
                Measurement(
                    f"prompt-heavy: service, scored rows only, vs {against}",
                    "tok/s",
                    runs["new"],
                    baseline=baseline,
                    target=target,
                    all_tokens_per_scored=all_per_scored,
                )
            )
    if "score_batch" in runs:
        m.append(
            Measurement(
                "prompt-heavy (ref): in-process score_batch, scored rows only",
                "tok/s",
                runs["score_batch"],
                baseline=limit,
                all_tokens_per_scored=all_per_scored,
            )
        )
    section.notes.append(
        "prompt-heavy: tok/s counts scored tokens (completions); `all tok/s` counts every "
        f"token of the sequences ({all_per_scored:g} per scored one). The limit is the body "
        "forward + the output layer on the scored rows + log-softmax/top-k, in process"
    )
    for name, used in memory.items():
        section.notes.append(memory_line(f"prompt-heavy server ({name})", used))
    if peak is not None:
        section.notes.append(f"in-process CUDA peak allocation (prompt-heavy): {peak:,.0f} MiB")
    section.report = {
        "model": str(model_dir),
        "vocab_size": vocab,
        "shape": {"batch": args.ph_batch, "prompt": prompt, "completion": completion},
        "backend_rows_only": rows_only,
        "server_commands": {name: shlex.join(s.command) for name, (s, _) in variants.items()},
        "server_memory_mib": memory,
        "server_metrics": metrics,
        "cuda_peak_mib": peak,
    }
    return section


def run_groups(ctx: Context) -> Section:
    """n samples per prompt: the service with prompt sharing against without."""
    args = ctx.args
    model_dir = resolve_model(args.group_model, args)
    backend = ctx.backends.get(model_dir)
    device, vocab = backend.device, backend.vocab_size
    prompt, completion, n = args.prompt_len, args.completion_len, args.samples
    length, score_from = prompt + completion, prompt
    generator = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, vocab, (args.groups, prompt), generator=generator)
    completions = torch.randint(0, vocab, (args.groups, n, completion), generator=generator)
    sequences = [
        prompts[g].tolist() + completions[g, s].tolist()
        for g in range(args.groups)
        for s in range(n)
    ]
    scored = args.shape_reps * len(sequences) * completion
    all_per_scored = length / completion
    max_batch_tokens = len(sequences) * (length - 1)  # a whole batch in one forward
    per_request = n if args.group_request == "group" else None
    window = args.window * (args.groups if per_request else 1)

    section = Section()
    variants: dict[str, ServerProcess] = {}
    if "--no-share-prefixes" in ctx.flags:
        variants["unshared"] = server_process(
            args, model_dir, max_batch_tokens, ["--no-share-prefixes"], metrics=True
        )
        variants["shared"] = server_process(args, model_dir, max_batch_tokens, metrics=True)
    else:
        variants["unshared"] = server_process(args, model_dir, max_batch_tokens, metrics=True)
        section.skipped.append(
            "groups: service, shared prompts (this tree's `serve` has no --no-share-prefixes, "
            "so it does not share prompts)"
        )

    print(f"\n== groups: {describe_model(model_dir, backend)}")
    requests = f"{args.groups} requests of {n}" if per_request else f"1 request of {len(sequences)}"
    print(
        f"shape:         {args.groups} prompts x {n} samples of ({prompt} prompt + "
        f"{completion} completion), score_from {score_from}, {requests} sequences per batch, "
        f"{args.shape_reps} batches per measurement, ScoreStream window {window}, "
        f"top_k {args.top_k}, float16"
    )
    for name, server in variants.items():
        print(f"server ({name}): {shlex.join(server.command)}")
        print(f"server log:    {server.log_path}")
    sys.stdout.flush()

    def batches(share: bool) -> Callable:
        one = in_process_batches(
            backend, sequences, len(sequences), args.top_k, score_from, {"share_prefixes": share}
        )
        return lambda: [one() for _ in range(args.shape_reps)]

    servers = list(variants.values())
    cuda_peak_mib(device)
    try:
        start_all(servers, [ctx.env] * len(servers))
        timed: dict[str, tuple[Callable, float]] = {}
        for name, server in variants.items():
            client = TeacherClient(server.address, timeout=600)
            fn = through_service(
                client, sequences, args.top_k, args.shape_reps, window, score_from, per_request
            )
            timed[name] = (fn, scored)
            through_service(client, sequences, args.top_k, 1, window, score_from, per_request)()
        timed["in-process unshared"] = (batches(False), scored)
        timed["in-process shared"] = (batches(True), scored)
        # what one batch's forwards computed, in process (also the in-process warm-up)
        computed = {
            name: computed_tokens(
                in_process_batches(
                    backend, sequences, len(sequences), args.top_k, score_from,
                    {"share_prefixes": share},
                ),
                sequences,
            )
            for name, share in (("unshared", False), ("shared", True))
        }  # fmt: skip
        runs = run_rounds(timed, args.rounds, "groups")
        memory = {name: server_memory(server.process.pid) for name, server in variants.items()}
        metrics = {name: scrape_metrics(server.http_port) for name, server in variants.items()}
    finally:
        stop_all(servers)
    peak = cuda_peak_mib(device)

    shape = f"{args.groups} x {n} x ({prompt}+{completion})"
    unshared = f"groups of {n}: service, no sharing, {shape}"
    m = section.measurements
    m.append(Measurement(unshared, "tok/s", runs["unshared"], all_tokens_per_scored=all_per_scored))
    if "shared" in runs:
        m.append(
            Measurement(
                f"groups of {n}: service, shared prompts",
                "tok/s",
                runs["shared"],
                baseline=unshared,
                target=GROUPS_TARGET,
                all_tokens_per_scored=all_per_scored,
            )
        )
    ref = "groups (ref): in-process score_batch, no sharing"
    m.append(
        Measurement(ref, "tok/s", runs["in-process unshared"], all_tokens_per_scored=all_per_scored)
    )
    if "in-process shared" in runs:
        m.append(
            Measurement(
                "groups (ref): in-process score_batch, shared prompts",
                "tok/s",
                runs["in-process shared"],
                baseline=ref,
                all_tokens_per_scored=all_per_scored,
            )
        )
    real = computed["unshared"]["real_tokens"]
    section.notes.append(
        f"groups: one batch holds {real:,} tokens fed to the model ({len(sequences)} sequences "
        f"x {length - 1}); what its forwards computed (in process, padding included):"
    )
    for name, found in computed.items():
        section.notes.append(
            f"  {name:<9} {found['computed_tokens']:>8,} tokens = "
            f"{found['computed_fraction']:.2f} of them, padding fraction "
            f"{found['padding_fraction']:.2f}"
        )
    if "shared" in computed:
        ideal = computed["unshared"]["computed_tokens"] / computed["shared"]["computed_tokens"]
        section.notes.append(f"  tokens computed unshared / shared: {ideal:.2f}")
    for name, found in metrics.items():
        if not found:
            continue
        count = found.get("teacher_batch_padding_fraction_count")
        mean = found.get("teacher_batch_padding_fraction_sum", 0) / count if count else None
        counters = ", ".join(
            f"{key} {value:,.0f}" for key, value in found.items() if "padding_fraction" not in key
        )
        section.notes.append(
            f"  server ({name}) /metrics: "
            + (
                f"padding fraction {mean:.2f} (mean of {count:.0f} forwards); "
                if mean is not None
                else ""
            )
            + counters
        )
    for name, used in memory.items():
        section.notes.append(memory_line(f"groups server ({name})", used))
    if peak is not None:
        section.notes.append(f"in-process CUDA peak allocation (groups): {peak:,.0f} MiB")
    section.report = {
        "model": str(model_dir),
        "vocab_size": vocab,
        "shape": {
            "groups": args.groups,
            "samples": n,
            "prompt": prompt,
            "completion": completion,
            "request": args.group_request,
        },
        "computed_tokens": computed,
        "server_commands": {name: shlex.join(s.command) for name, s in variants.items()},
        "server_memory_mib": memory,
        "server_metrics": metrics,
        "cuda_peak_mib": peak,
    }
    return section


def run_mixed(ctx: Context) -> Section:
    """Sequences of mixed lengths in one batch: packed rows against rows padded to the longest."""
    args = ctx.args
    model_dir = resolve_model(args.group_model, args)
    backend = ctx.backends.get(model_dir)
    generator = torch.Generator().manual_seed(4)
    lengths = torch.randint(args.mixed_min, args.prompt_len + args.completion_len + 1,
                            (args.mixed_batch,), generator=generator).tolist()  # fmt: skip
    sequences = [torch.randint(0, backend.vocab_size, (n,), generator=generator).tolist()
                 for n in lengths]  # fmt: skip
    scored = args.shape_reps * sum(n - 1 for n in lengths)  # score_from 1: every position
    budget = len(lengths) * max(lengths)  # the batcher counts rows x longest: one forward
    variants = {"packed": server_process(args, model_dir, budget)}
    section = Section()
    if "--no-packing" in ctx.flags:
        variants["padded"] = server_process(args, model_dir, budget, ["--no-packing"])
    else:
        section.skipped.append("mixed: this tree's `serve` has no --no-packing")

    print(f"\n== mixed: {describe_model(model_dir, backend)}")
    print(
        f"shape:         1 request of {len(lengths)} sequences of {min(lengths)}-{max(lengths)} "
        f"tokens, every position scored, {args.shape_reps} batches per measurement, top_k "
        f"{args.top_k}, float16"
    )
    for name, server in variants.items():
        print(f"server ({name}): {shlex.join(server.command)}")
    sys.stdout.flush()

    def batches(pack: bool) -> Callable:
        return in_process_batches(
            backend,
            sequences,
            len(sequences),
            args.top_k,
            1,
            {"pack": pack, "share_prefixes": False},
        )

    servers = list(variants.values())
    try:
        start_all(servers, [ctx.env] * len(servers))
        timed: dict[str, tuple[Callable, float]] = {}
        for name, server in variants.items():
            client = TeacherClient(server.address, timeout=600)
            timed[name] = (
                through_service(client, sequences, args.top_k, args.shape_reps, 1),
                scored,
            )
            through_service(client, sequences, args.top_k, 1, 1)()
        for pack in (False, True):
            one = batches(pack)
            timed[f"in-process {'packed' if pack else 'padded'}"] = (
                lambda one=one: [one() for _ in range(args.shape_reps)],
                scored,
            )
        computed = {name: computed_tokens(batches(name == "packed"), sequences)
                    for name in ("padded", "packed")}  # fmt: skip
        runs = run_rounds(timed, args.rounds, "mixed")
    finally:
        stop_all(servers)

    m = section.measurements
    padded = "mixed: in-process score_batch, padded rows"
    m.append(Measurement(padded, "tok/s", runs["in-process padded"]))
    m.append(Measurement("mixed: in-process score_batch, packed rows", "tok/s",
                         runs["in-process packed"], baseline=padded))  # fmt: skip
    if "padded" in runs:
        m.append(Measurement("mixed: service, --no-packing", "tok/s", runs["padded"]))
        m.append(Measurement("mixed: service, packed", "tok/s", runs["packed"],
                             baseline="mixed: service, --no-packing"))  # fmt: skip
    section.notes.append(
        f"mixed: one batch holds {computed['packed']['real_tokens']:,} tokens fed to the model; "
        "what its forward computed (in process):"
    )
    for name, found in computed.items():
        section.notes.append(
            f"  {name:<7} {found['computed_tokens']:>8,} tokens, padding fraction "
            f"{found['padding_fraction']:.2f}"
        )
    section.report = {"model": str(model_dir), "lengths": lengths, "computed_tokens": computed}
    return section


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    arg = parser.add_argument
    arg("--quick", action="store_true", help="smaller shapes, fewer rounds (under 2 minutes)")
    arg(
        "--shapes",
        default=",".join(SHAPES),
        help=f"the sections to run, comma-separated, of {', '.join(SHAPES)} (default: all)",
    )
    arg(
        "--model",
        help=f"base: a local HF causal-LM directory, a preset ({', '.join(PRESETS)}) or a spec "
        "vVOCAB-hHIDDEN-lLAYERS (default: the model of --vocab-size, --hidden-size, --layers)",
    )
    arg("--device", default="auto", help="auto, cpu, cuda or cuda:N (servers and baselines)")
    arg("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights")
    arg("--batch-size", type=int, help="base throughput: sequences per batch (16; quick 8)")
    arg("--seq-len", type=int, help="base throughput: tokens per sequence (256; quick 128)")
    arg("--reps", type=int, help="base throughput: batches per measurement (4; quick 3)")
    arg("--rounds", type=int, help="baseline/service alternations, every section (5; quick 2)")
    arg("--window", type=int, default=2, help="ScoreStream requests in flight")
    arg("--clients", type=int, default=8, help="batching: concurrent clients")
    arg("--small-len", type=int, default=32, help="batching: tokens per request")
    arg("--small-requests", type=int, help="batching: requests per client per round (32; quick 12)")
    arg("--top-k", type=int, default=64)
    arg("--max-wait-ms", type=float, help="the servers' --max-wait-ms (default: the server's)")
    arg(
        "--max-batch-tokens",
        type=int,
        help="base: the server's --max-batch-tokens (default: batch-size x (seq-len - 1), so "
        "that each of its throughput forwards has the in-process baseline's shape; the other "
        "sections size theirs to one request per forward)",
    )
    arg("--threads", type=int, help="torch threads, all processes (default: torch's default)")
    arg("--vocab-size", type=int, default=4000, help="base, built model: vocabulary size")
    arg("--hidden-size", type=int, default=384, help="base, built model: hidden size")
    arg("--layers", type=int, default=6, help="base, built model: decoder layers")
    arg("--prompt-len", type=int, default=384, help="prompt-heavy and groups: prompt tokens")
    arg("--completion-len", type=int, default=128, help="prompt-heavy and groups: scored tokens")
    arg(
        "--ph-model",
        default="v32000-h256-l4",
        help="prompt-heavy: base, a preset, a spec vVOCAB-hHIDDEN-lLAYERS, or a model dir",
    )
    arg("--ph-batch", type=int, help="prompt-heavy: sequences per request (8)")
    arg(
        "--old-tree",
        type=Path,
        help="prompt-heavy: run today's-path server from this source tree (a checkout before "
        "the new path) instead of `serve --full-logits`",
    )
    arg("--group-model", default="base", help="groups: base, a preset, a spec, or a model dir")
    arg("--groups", type=int, help="groups: prompts per batch (2; quick 1)")
    arg("--samples", type=int, default=8, help="groups: samples (sequences) per prompt")
    arg(
        "--group-request",
        choices=["batch", "group"],
        default="batch",
        help="groups: one request per batch of groups (as a trainer's micro-batch), or per group",
    )
    arg("--mixed-batch", type=int, default=32, help="mixed: sequences per batch")
    arg("--mixed-min", type=int, default=16, help="mixed: the shortest sequence (the longest: "
        "prompt-len + completion-len)")  # fmt: skip
    arg("--shape-reps", type=int, help="prompt-heavy, groups: batches per measurement (3; quick 2)")
    arg("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    defaults = {  # name: (default, --quick)
        "batch_size": (16, 8),
        "seq_len": (256, 128),
        "reps": (4, 3),
        "rounds": (5, 2),
        "small_requests": (32, 12),
        "ph_batch": (8, 8),
        "groups": (2, 1),
        "shape_reps": (3, 2),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = set(args.shapes) - set(SHAPES)
    if unknown or not args.shapes:
        parser.error(f"--shapes: expected some of {', '.join(SHAPES)}, got {args.shapes}")
    if args.old_tree is not None and not (args.old_tree / "teacher_service").is_dir():
        parser.error(f"--old-tree {args.old_tree}: no teacher_service/ there")
    return args


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()  # keep the report readable
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's default follows it
    ctx = Context(args, Backends(args), env, server_flags(env))

    command = shlex.join([sys.executable, *sys.argv])
    server_threads = (
        f"OMP_NUM_THREADS={args.threads}" if args.threads else f"torch default ({default_threads})"
    )
    device = resolve_device(args.device)
    print(f"command:       {command}")
    print(
        f"platform:      python {platform.python_version()}, torch {torch.__version__}, "
        f"device {device}, {os.cpu_count()} CPUs"
    )
    print(f"torch threads: {torch.get_num_threads()} in this process; servers: {server_threads}")
    print(f"sections:      {', '.join(args.shapes)}")
    print(f"rounds:        {args.rounds}, alternating baselines and services; medians reported")
    print(flush=True)

    runners = {
        "base": run_base,
        "prompt-heavy": run_prompt_heavy,
        "groups": run_groups,
        "mixed": run_mixed,
    }
    sections = {shape: runners[shape](ctx) for shape in SHAPES if shape in args.shapes}
    measurements = [m for section in sections.values() for m in section.measurements]
    judge(measurements)
    print()
    print_table(measurements)
    print()
    for section in sections.values():
        for line in section.notes:
            print(line)
    skipped = [line for section in sections.values() for line in section.skipped]
    for line in skipped:
        print(f"skipped: {line}")
    failed = [m.name for m in measurements if m.passed is False]
    verdict = "all targets met" if not failed else "FAILED: " + "; ".join(failed)
    print(f"\n{verdict}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    noisy = [m.name for m in measurements if len(m.rounds) > 1 and m.spread > NOISY_SPREAD]
    if noisy:
        print(
            f"warning: rounds differ by more than {NOISY_SPREAD:.0%} (a noisy machine?): "
            + "; ".join(noisy)
            + ". Rerun, or raise --rounds."
        )

    if args.json:
        report = {
            "command": command,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(device),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "server_threads": args.threads or default_threads,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "measurements": [
                asdict(m) | {"value": m.value, "spread": m.spread} for m in measurements
            ],
            "skipped": skipped,
            "all_passed": not failed,
        }
        if torch.cuda.is_available() and device.type == "cuda":
            report["gpu"] = torch.cuda.get_device_name(device)
        if "base" in sections:
            report |= sections["base"].report
        for shape in ("prompt-heavy", "groups", "mixed"):
            if shape in sections:
                report[shape.replace("-", "_")] = sections[shape].report
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

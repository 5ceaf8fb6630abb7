"""Benchmark one on-policy GKD step: teacher behind the service vs in-process vs TRL.

Run it from the repository root (`make bench-trainer` does):

    .venv/bin/python bench/bench_trainer.py             # ~2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_trainer.py --quick     # ~1 minute
    .venv/bin/python bench/bench_trainer.py --memory    # peak memory, full vs chunked logits

One step, the same for all three: 8 prompts, the student samples up to 16 new tokens each
(temperature 1, stop at eos), the teacher scores prompt + completion, generalized
JSD(beta = 0.5) token-level mean, backward, clip 1.0, AdamW (constant lr).

- service:    our trainer, teacher = `teacher-service serve` in a separate process on
              loopback, top-64 + tail bucket over gRPC, scoring overlapped with the student;
- in-process: our trainer, the same teacher model called directly in this process;
- TRL:        trl.DistillationTrainer and trl.experimental.gkd.GKDTrainer (TRL's
              in-process-teacher on-policy GKD) on the same models and prompts
              (bench/trl_reference.py); skipped when TRL is not installed.

Ours runs twice each: synchronous (rollout.max_staleness 0) and with steps built ahead
(k=1: step t + 1 is sampled and scored while step t trains). Targets: k=1 <= 0.7x k=0
through the service with `--separate-cores`, no slower on shared cores; through the service
<= 1.0x TRL's in-process trainers.

The target (docs/design.md): a step no slower than TRL's in-process-teacher trainer. By default
the service's teacher competes with the trainer for the same cores, an upper bound on the
service's cost; `--separate-cores` gives every trainer CPU 0 (1 thread) and the service
CPU 1, a teacher on its own device as deployed (TRL and the in-process teacher then run
the teacher on the trainer's core, as they do on a GPU). The configurations alternate over
several rounds and the table reports medians per step.

`--memory` measures something else: the peak memory of one training step's student side
(forward, top-64 generalized JSD, backward, clip, AdamW) at a 32k and a 152k vocabulary,
with the student's logits at every position and the loss over all rows at once (the path
before issue 15, still the one for a model whose output layer cannot be split off) against
completion rows only, a chunk at a time (student.loss_chunk_rows). Each runs in a process
of its own: CPU peak RSS, plus CUDA max_memory_allocated on a GPU (`--device cuda`). The
teacher's signal is synthetic (its memory is the service's, not the trainer's).

On a GPU (bench/gpu.sh): `--device cuda` puts the student and the service's teacher there
(`--dtype`: the server's weights), `--autocast bf16` runs the student's training forward
under autocast, `--teacher-model`/`--student-model` take bench_service.py's model arguments
(`qwen2-0.5b`: Qwen2-0.5B's shape at random weights, a 152k vocabulary), and
`--service-only` times only our trainer against the service (no in-process teacher, no
TRL). The JSON then also holds each configuration's peak CUDA memory in the trainer's
process (torch.cuda.max_memory_allocated: weights, AdamW state, activations) and the
server's, as nvidia-smi reports it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import ROOT, ServerProcess, resolve_model, server_memory
from trl_reference import trl_step_seconds

from distill_lab.tiny_model import TinyModelSpec, build_tiny_model
from student_trainer.config import DEFAULT_LOSS_CHUNK_ROWS, load_config
from student_trainer.data import encode_prompt
from student_trainer.losses import token_level_loss
from student_trainer.objective import TeacherRows, divergence
from student_trainer.rollouts import build_batch
from student_trainer.student import Student
from student_trainer.tasks import TASKS
from student_trainer.teacher import LocalTeacher
from student_trainer.train import Trainer
from teacher_client.objectives import make_objective
from teacher_service.cli import free_port, serve_command

WARMUP_STEPS = 2
MEMORY_VOCABULARIES = (32_000, 151_936)  # Llama 2's, Qwen 2's (padded to 152,064 rows)
MEMORY_PATHS = ("full logits", "chunked rows")


def build_models(args: argparse.Namespace) -> tuple[Path, Path]:
    """Teacher and student for the benchmark, cached under .cache/ (same tokenizer):
    --teacher-model and --student-model, or built of --teacher-hidden, --student-hidden,
    ... (a student built for a --teacher-model takes that model's tokenizer)."""

    def spec(hidden: int, layers: int, seed: int) -> TinyModelSpec:
        return TinyModelSpec(
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3,
            num_layers=layers,
            num_heads=max(2, hidden // 64),
            num_kv_heads=2,
            seed=seed,
        )

    if args.teacher_model:
        teacher = resolve_model(args.teacher_model)
    else:
        teacher = ROOT / ".cache" / f"bench-teacher-h{args.teacher_hidden}-l{args.teacher_layers}"
        if not (teacher / "config.json").is_file():
            build_tiny_model(teacher, spec(args.teacher_hidden, args.teacher_layers, 0))
    if args.student_model:
        return teacher, resolve_model(args.student_model)
    student = ROOT / ".cache" / f"bench-student-h{args.student_hidden}-l{args.student_layers}"
    if args.teacher_model:
        student = student.with_name(f"{student.name}-for-{teacher.name}")
    if not (student / "config.json").is_file():
        build_tiny_model(
            student, spec(args.student_hidden, args.student_layers, 1), tokenizer_from=teacher
        )
    return teacher, student


def describe(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    tied = ", tied" if config.get("tie_word_embeddings") else ""
    shape = f"h{config['hidden_size']}/l{config['num_hidden_layers']}"
    return f"{model_dir.name} ({shape}, vocabulary {config['vocab_size']}{tied})"


def our_steps(
    args, student: Path, address: str, teacher=None, staleness: int = 0
) -> tuple[list[float], float, float | None]:
    """Seconds per step of our trainer (after warmup), the mean hidden teacher fraction and
    the peak CUDA memory of this process in MiB (None off CUDA); `staleness`:
    rollout.max_staleness (1: step t + 1 sampled and scored while t trains)."""
    config = load_config(
        None,
        [
            f"student.model={student}",
            f"student.device={args.device}",
            f"student.autocast={args.autocast}",
            f"teacher.address={address}",
            f"run.out_dir={ROOT / 'runs' / 'bench-trainer'}",
            "run.progress=false",
            f"optim.batch_size={args.batch_size // args.grad_accum}",
            f"optim.grad_accum={args.grad_accum}",
            "optim.schedule=constant",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "method.loss=jsd",
            "method.loss_args.beta=0.5",
            f"method.top_k={args.top_k}",
            f"rollout.max_staleness={staleness}",
        ],
    )
    cuda = torch.device(args.device).type == "cuda"
    if cuda:  # what the previous configuration's trainer left is not this one's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config, teacher=teacher)
    try:
        records = [trainer.train_step() for _ in range(WARMUP_STEPS + args.steps)]
    finally:
        trainer.close()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    timed = records[WARMUP_STEPS:]
    hidden = statistics.mean(r["hidden_fraction"] for r in timed)
    return [r["step_s"] for r in timed], hidden, peak


def memory_step(args: argparse.Namespace) -> dict[str, float]:
    """One training step's student side at vocabulary `args.memory_step[0]` by path
    `args.memory_step[1]` (one of MEMORY_PATHS): what it adds to the peak memory."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab, path = int(args.memory_step[0]), args.memory_step[1]
    device = torch.device(args.device)
    words = {f"t{i}": i for i in range(vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, "t0")))
    config = LlamaConfig(
        vocab_size=(vocab // 128 + 1) * 128,  # padded output rows, as real checkpoints have
        hidden_size=args.student_hidden,
        intermediate_size=args.student_hidden * 8 // 3,
        num_hidden_layers=args.student_layers,
        num_attention_heads=max(2, args.student_hidden // 64),
        num_key_value_heads=2,
        max_position_embeddings=args.memory_prompt + args.memory_completion,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    chunked = path == "chunked rows"
    student = Student(
        model, tokenizer, frozenset({2}), 0, args.loss_chunk_rows if chunked else 0, chunked
    )
    prompts = torch.randint(3, vocab, (args.batch_size, args.memory_prompt)).tolist()
    completions = torch.randint(3, vocab, (args.batch_size, args.memory_completion)).tolist()
    batch = build_batch(prompts, completions, eos_ids={2}, pad_id=0)
    n = batch.num_tokens
    support = torch.randint(0, vocab, (n, args.top_k))
    teacher = TeacherRows(
        torch.zeros(n), support, torch.randn(n, args.top_k).log_softmax(-1) - 0.5, None
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    resident, allocated = _peak_rss_mb(), _cuda_mb(device, torch.cuda.memory_allocated)
    started = time.perf_counter()
    rows, targets = student.completion_rows(batch)
    objective = make_objective("jsd", beta=0.5, top_k=args.top_k)
    per_token, _ = divergence(rows, targets, teacher, objective)
    token_level_loss(per_token, torch.ones_like(per_token, dtype=torch.bool), n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "rows": n,
        "rss_mb": _peak_rss_mb() - resident,
        "cuda_mb": _cuda_mb(device, torch.cuda.max_memory_allocated) - allocated,
        "step_s": time.perf_counter() - started,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda_mb(device: torch.device, measure) -> float:
    return measure(device) / 2**20 if device.type == "cuda" else 0.0


def memory_main(args: argparse.Namespace) -> None:
    """--memory: every vocabulary and path in a fresh process (a process's peak only grows),
    printed side by side."""
    # glibc keeps a freed block under its mmap threshold (dynamic, up to 32 MB) in the heap,
    # where RSS counts it as live: a fixed threshold returns every large tensor on free
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    results: dict[tuple[int, str], dict[str, float]] = {}
    for vocab in MEMORY_VOCABULARIES:
        for path in MEMORY_PATHS:
            print(f"vocabulary {vocab}, {path}", flush=True)
            command = [sys.executable, __file__, "--memory-step", str(vocab), path]
            command += _memory_flags(args)
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            results[vocab, path] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = next(iter(results.values()))["rows"]
    print(
        f"\none training step's student side: {args.batch_size} x ({args.memory_prompt} prompt "
        f"+ {args.memory_completion} completion) tokens = {rows} completion rows, student "
        f"h{args.student_hidden}/l{args.student_layers}, top-{args.top_k} JSD(0.5), "
        f"loss_chunk_rows {args.loss_chunk_rows}, {args.device}"
    )
    cuda = args.device.startswith("cuda")
    header = f"{'vocabulary':>10s} {'path':14s} {'peak RSS MB':>12s}"
    print(header + (f" {'CUDA MB':>10s}" if cuda else "") + f" {'step s':>8s}")
    for (vocab, path), out in results.items():
        line = f"{vocab:>10d} {path:14s} {out['rss_mb']:12.0f}"
        print(line + (f" {out['cuda_mb']:10.0f}" if cuda else "") + f" {out['step_s']:8.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "memory": {f"{v}/{p}": out for (v, p), out in results.items()},
                    "args": vars(args) | {"json": str(args.json)},
                    "time": time.time(),
                },
                indent=2,
            )
        )


def _memory_flags(args: argparse.Namespace) -> list[str]:
    """The flags a --memory-step child needs to measure what its parent was asked."""
    return [
        f"--batch-size={args.batch_size}",
        f"--memory-prompt={args.memory_prompt}",
        f"--memory-completion={args.memory_completion}",
        f"--student-hidden={args.student_hidden}",
        f"--student-layers={args.student_layers}",
        f"--top-k={args.top_k}",
        f"--loss-chunk-rows={args.loss_chunk_rows}",
        f"--device={args.device}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="ours only (TRL: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument(
        "--service-only",
        action="store_true",
        help="only our trainer through the service (no in-process teacher, no TRL)",
    )
    parser.add_argument(
        "--teacher-model",
        help="bench_service.py's model argument: a preset (qwen2-0.5b), a spec "
        "vVOCAB-hHIDDEN-lLAYERS or a model dir (default: built of --teacher-hidden/-layers)",
    )
    parser.add_argument(
        "--student-model",
        help="as --teacher-model; it must have the teacher's tokenizer (default: built of "
        "--student-hidden/-layers with the teacher's tokenizer)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="the service's weights (default: the server's)",
    )
    parser.add_argument(
        "--autocast", default="none", choices=["none", "bf16", "fp16"], help="student.autocast"
    )
    parser.add_argument(
        "--separate-cores",
        action="store_true",
        help="trainers (ours and TRL) on CPU 0 with 1 thread, the service's teacher on CPU 1 "
        "with 1 thread: a teacher on its own device, as deployed",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--memory", action="store_true", help="peak memory of a step: full vs chunked logits"
    )
    parser.add_argument("--memory-prompt", type=int, default=64, help="--memory: prompt tokens")
    parser.add_argument("--memory-completion", type=int, default=256, help="--memory: new tokens")
    parser.add_argument(
        "--loss-chunk-rows", type=int, default=DEFAULT_LOSS_CHUNK_ROWS, help="--memory: chunk"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: the student, the service's teacher, --memory"
    )
    parser.add_argument("--memory-step", nargs=2, help=argparse.SUPPRESS)  # one child's run
    args = parser.parse_args()
    if args.memory_step:
        print(json.dumps(memory_step(args)))
        return
    if args.memory:
        memory_main(args)
        return
    if args.quick:
        args.rounds, args.steps = 2, 5
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    server_prefix: list[str] = []
    if args.separate_cores:
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        server_prefix = ["taskset", "-c", "1"]
    teacher_dir, student_dir = build_models(args)
    task = TASKS["addition"].splits(64, 0, 0, seed=0).train
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    prompts = [encode_prompt(tokenizer, e.prompt) for e in task]

    port = free_port()
    device_flags = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    server = ServerProcess(
        serve_command(teacher_dir, port, *device_flags),
        f"127.0.0.1:{port}",
        ROOT / "runs" / "bench-trainer-server.log",
    )
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    server.command = server_prefix + server.command
    threads = {"OMP_NUM_THREADS": "1"} if args.separate_cores else {}
    server.start({**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **threads})
    ours = {  # configuration: (teacher address, in-process teacher, rollout.max_staleness)
        "service": (server.address, None, 0),
        "service k=1": (server.address, None, 1),
    }
    if not args.service_only:
        in_process = LocalTeacher.load(teacher_dir, device=args.device)
        ours["in-process"] = ("unused:1", in_process, 0)
        ours["in-process k=1"] = ("unused:1", in_process, 1)
    no_trl = args.no_trl or args.service_only
    trls = {} if no_trl else {"TRL Distill": "distillation", "TRL GKD": "gkd"}
    times: dict[str, list[float]] = {name: [] for name in [*ours, *trls]}
    hidden: dict[str, list[float]] = {name: [] for name in ours}
    peaks: dict[str, list[float]] = {name: [] for name in ours}
    try:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            for name, (address, teacher, staleness) in ours.items():
                steps, frac, peak = our_steps(args, student_dir, address, teacher, staleness)
                times[name] += steps
                hidden[name].append(frac)
                if peak is not None:
                    peaks[name].append(peak)
            for name, trainer in trls.items():
                trl = trl_step_seconds(
                    str(teacher_dir),
                    str(student_dir),
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size,
                    steps=WARMUP_STEPS + args.steps,
                    beta=0.5,
                    lr=1e-3,
                    seed=round_index,
                    trainer=trainer,
                )
                if trl is not None:
                    times[name].append(trl)
        served = server_memory(server.process.pid)
    finally:
        server.stop()

    median = {k: statistics.median(v) for k, v in times.items() if v}
    peak_mib = {k: max(v) for k, v in peaks.items() if v}
    print(
        f"\none on-policy GKD step: {args.batch_size} prompts x <= {args.max_new_tokens} new "
        f"tokens, teacher {describe(teacher_dir)} (weights: {args.dtype or 'the default'}), "
        f"student {describe(student_dir)} on {args.device}, autocast {args.autocast}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    peak_header = f" {'peak CUDA MiB':>14s}" if peak_mib else ""
    print(f"{'configuration':16s} {'median ms/step':>15s} {'teacher hidden':>15s}{peak_header}")
    for name, value in median.items():
        share = f"{statistics.mean(hidden[name]):.0%}" if name in hidden else "-"
        peak = f" {peak_mib[name]:14.0f}" if name in peak_mib else ""
        print(f"{name:16s} {value * 1000:15.1f} {share:>15s}{peak}")
    if served["gpu_mib"] is not None:
        print(f"the service's GPU memory (nvidia-smi, its cache included): {served['gpu_mib']} MiB")
    pairs = [  # (numerator, denominator, target): async <= 0.7x sync with its own cores,
        # no slower on shared ones; through the service <= TRL's in-process trainer
        ("service k=1", "service", 0.7 if args.separate_cores else 1.0),
        ("in-process k=1", "in-process", None),
        ("service", "in-process", None),
        *[(ours, trl, 1.0) for trl in trls for ours in ("service", "service k=1")],
        *[("in-process", trl, None) for trl in trls],
    ]
    ratios = {}
    for a, b, target in pairs:
        if a in median and b in median:
            ratios[f"{a} / {b}"] = value = median[a] / median[b]
            verdict = (
                ""
                if target is None
                else f"  target <= {target}: " + ("met" if value <= target else "NOT met")
            )
            print(f"{a + ' / ' + b:30s} {value:.2f}x  (lower is faster){verdict}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "median_s": median,
                    "ratios": ratios,
                    "hidden": {k: statistics.mean(v) for k, v in hidden.items()},
                    "peak_cuda_mib": peak_mib,
                    "server_memory": served,
                    "teacher": describe(teacher_dir),
                    "student": describe(student_dir),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if peak_mib else None,
                    "args": vars(args) | {"json": str(args.json)},
                    "time": time.time(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

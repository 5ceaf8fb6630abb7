"""A short run of every training method, reduced to fingerprints that two versions of the
code can be compared by: the per-step losses, every evaluation, and a hash of the written
checkpoint (weights, optimizer moments, schedule, every random stream).

A refactor that claims to change no number runs this before and after and diffs the
output (docs/status.md, issue 28):

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python scripts/method_fingerprints.py --out /tmp/before.json)
    python scripts/method_fingerprints.py --out /tmp/after.json
    diff /tmp/before.json /tmp/after.json

Every run uses the committed records models (the smallest student), the teacher
in-process, 4 steps and two evaluations on 8 validation prompts, on the CPU. `--keys
legacy` (the default) selects the losses with the keys older versions knew (method.beta,
method.support); `--keys loss` with method.loss, where this version has it: both must
print the same numbers. One torch thread unless `--threads N` (docs/training.md,
"Reproducible runs").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_trainer.config import load_config  # noqa: E402
from student_trainer.train import train  # noqa: E402

COMMON = [
    "student.model=models/records/student-small",
    "teacher.in_process=models/records/teacher",
    "task.name=records",
    "task.train_size=64",
    "task.validation_size=8",
    "run.progress=false",
    "run.eval_size=8",
    "run.eval_every=2",
    "run.save_every=0",
    "optim.steps=4",
    "optim.batch_size=4",
    "optim.warmup_steps=1",
    "optim.lr=0.003",
    "rollout.max_new_tokens=24",
]

# name -> (overrides with the old keys, overrides with method.loss)
METHODS: dict[str, tuple[list[str], list[str]]] = {
    "sft": (["method.name=sft"], ["method.name=sft"]),
    "seqkd": (["method.name=seqkd"], ["method.name=seqkd"]),
    "jsd_topk": ([], ["method.loss=jsd", "method.loss_args.beta=0.5"]),
    "forward_kl": (["method.beta=0"], ["method.loss=forward_kl"]),
    "reverse_kl": (["method.beta=1"], ["method.loss=reverse_kl"]),
    "jsd_full": (
        ["method.support=full"],
        ["method.loss=jsd", "method.loss_args.support=full"],
    ),
    "sampled_rkl": (["method.support=sampled", "method.beta=1"], ["method.loss=sampled_rkl"]),
    "candidates": (
        ["method.beta=1", "method.student_candidates=4"],
        ["method.loss=reverse_kl", "method.student_candidates=4"],
    ),
    "temperature": (
        ["method.beta=0", "method.temperature=2"],
        ["method.loss=forward_kl", "method.temperature=2"],
    ),
    "mixed_lmbda": (["method.lmbda=0.5"], ["method.lmbda=0.5", "method.loss=jsd"]),
    "supervised_kd": (["method.lmbda=0"], ["method.lmbda=0", "method.loss=jsd"]),
    "rl_gkd": (
        ["method.beta=1", "method.alpha=0.5", "method.samples_per_prompt=2"],
        ["method.loss=reverse_kl", "method.alpha=0.5", "method.samples_per_prompt=2"],
    ),
    "staleness": (
        ["method.beta=1", "rollout.max_staleness=1"],
        ["method.loss=reverse_kl", "rollout.max_staleness=1"],
    ),
    "grad_accum": (
        ["method.beta=0", "optim.grad_accum=2"],
        ["method.loss=forward_kl", "optim.grad_accum=2"],
    ),
}


def _digest(value: Any, hasher: Any) -> None:
    """Feed every tensor, number and string of a (nested) checkpoint value to `hasher`."""
    if isinstance(value, torch.Tensor):
        hasher.update(str((value.dtype, tuple(value.shape))).encode())
        hasher.update(
            value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            hasher.update(str(key).encode())
            _digest(value[key], hasher)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, hasher)
    else:
        hasher.update(repr(value).encode())


def checkpoint_hash(directory: Path) -> dict[str, str]:
    """sha256 of each file of the checkpoint; trainer_state.pt by its contents (pickle
    bytes may differ for equal values); the config it holds, and config.yaml, left out."""
    hashes = {}
    for path in sorted(directory.iterdir()):
        if path.name in ("config.yaml", "trainer_state.pt"):
            continue
        hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    state = torch.load(directory / "trainer_state.pt", weights_only=False)
    state.pop("config")  # the run's config, with its temporary out_dir and the new keys
    hasher = hashlib.sha256()
    _digest(state, hasher)
    hashes["trainer_state.pt"] = hasher.hexdigest()[:16]
    return hashes


def fingerprint(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    # a checkpoint keeps Python's and numpy's global generators, which the trainer seeds
    # from run.seed only since issue 29 (nothing it computes draws from them): seeded here
    # as it does, so that their state compares with older versions' too
    random.seed(0)
    np.random.seed(0)
    config = load_config(None, [*COMMON, f"run.out_dir={out_dir}", *overrides])
    result = train(config)
    checkpoints = sorted((out_dir / "checkpoints").glob("step-*"))
    return {
        "losses": [repr(loss) for loss in result.losses],
        "evaluations": [{k: repr(v) for k, v in e.items()} for e in result.evaluations],
        "checkpoint": checkpoint_hash(checkpoints[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", choices=("legacy", "loss"), default="legacy")
    parser.add_argument("--only", nargs="*", help="method names (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: see the docstring)"
    )
    args = parser.parse_args()
    # one thread: the same reduction order on every machine. torch does not promise the
    # same bits at another count (a reduction split over threads adds in another order);
    # --threads 2 against the default shows whether they move (on 2 CPU cores they did not)
    torch.set_num_threads(args.threads)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (legacy, loss) in METHODS.items():
            if args.only and name not in args.only:
                continue
            overrides = legacy if args.keys == "legacy" else loss
            report[name] = fingerprint(overrides, Path(tmp) / name)
            print(f"{name}: done", file=sys.stderr)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

"""torchrun data parallelism: a 2-process gloo run computes the 1-process run's steps (same
global batch), its checkpoint resumes in 1 process, and on-policy ranks sample apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.checkpoint import STATE_FILE, checkpoint_dirs
from student_trainer.distributed import World
from tests.replicas import Replica

STEPS = 4


def test_shards_partition_the_global_batch():
    items = list(range(11))
    for size in (1, 2, 3, 4, 11):
        shards = [World(rank, size).shard(items) for rank in range(size)]
        assert [x for shard in shards for x in shard] == items  # contiguous, in order
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match=r"optim\.batch_size"):
        World(0, 4).shard([1, 2, 3])


@pytest.fixture(scope="module")
def pool(tiny_model_dir):
    """Two teacher replicas: every rank of a run sends its calls to the pool."""
    replicas = [Replica(tiny_model_dir).start() for _ in range(2)]
    yield replicas
    for replica in replicas:
        replica.kill()


def run_trainer(out_dir: Path, overrides: list[str], nproc: int = 1, resume: str = "") -> list:
    """`student-trainer train` alone or under torchrun, exactly as a user starts it."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, "-m", "student_trainer", "train", "--set", f"run.out_dir={out_dir}"]
    for item in overrides:
        command += ["--set", item]
    if resume:
        command += ["--resume", resume]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    # both ends of the output: torchrun's summary closes it, a rank's own error may open it
    assert done.returncode == 0, (
        f"{done.stdout[-1500:]}\n--- stderr ---\n{done.stderr[:2500]}\n...\n{done.stderr[-3000:]}"
    )
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def overrides(pool: list[Replica], student_dir: Path, *extra: str) -> list[str]:
    return [
        f"student.model={student_dir}",
        "teacher.address=" + ",".join(replica.address for replica in pool),
        "task.name=addition",
        "task.train_size=64",
        "optim.batch_size=5",  # shared 3 + 2: uneven shards weigh by tokens, not by rank
        "optim.grad_accum=2",  # DDP's no_sync on the first micro-batch
        f"optim.steps={STEPS}",
        "optim.warmup_steps=1",
        "optim.lr=0.01",
        "rollout.max_new_tokens=6",
        "run.eval_size=4",
        "run.eval_every=0",
        "run.save_every=2",
        "run.progress=false",
        *extra,
    ]


def test_two_processes_equal_one_and_resume_in_one(pool, student_model_dir, tmp_path):
    # supervised KD (lambda 0): the data decide every token, so the runs must agree exactly
    settings = overrides(pool, student_model_dir, "method.lmbda=0")
    alone = run_trainer(tmp_path / "one", settings)
    pair = run_trainer(tmp_path / "two", settings, nproc=2)
    assert sorted(losses(pair)) == list(range(1, STEPS + 1))
    assert losses(pair) == pytest.approx(losses(alone), abs=1e-4)
    assert [r["tokens"] for r in pair if "loss" in r] == [r["tokens"] for r in alone if "loss" in r]
    # rank 0 alone evaluates and logs: once at step 0 and once at the end
    assert [r["step"] for r in pair if "eval/metric" in r] == [0, STEPS]

    pair_final, alone_final = (
        checkpoint_dirs(tmp_path / "two")[-1],
        checkpoint_dirs(tmp_path / "one")[-1],
    )
    # to the teacher's rounding: its log-probs move by ~3e-6 with the sequences a forward
    # holds (padding, packing: docs/design.md), and two processes' calls share forwards
    # differently from one's; four steps carried that to 2e-5 in one weight (AdamW moves
    # each weight by about the learning rate, 1e-2, a step)
    for name, value in weights(alone_final).items():
        torch.testing.assert_close(weights(pair_final)[name], value, atol=1e-4, rtol=1e-4)

    # the 2-process run's half-way checkpoint, continued by one process
    halfway = checkpoint_dirs(tmp_path / "two")[0]
    assert halfway.name.endswith("2")
    resumed = run_trainer(tmp_path / "resumed", settings, resume=str(halfway))
    assert sorted(losses(resumed)) == [3, 4]
    assert losses(resumed) == pytest.approx({s: losses(alone)[s] for s in (3, 4)}, abs=1e-4)
    resumed_final = checkpoint_dirs(tmp_path / "resumed")[-1]
    for name, value in weights(alone_final).items():
        torch.testing.assert_close(weights(resumed_final)[name], value, atol=1e-4, rtol=1e-4)


def test_on_policy_ranks_sample_apart_and_checkpoint_every_stream(
    pool, student_model_dir, tmp_path
):
    settings = overrides(pool, student_model_dir, "optim.steps=2", "run.eval_size=0")
    before = [replica.requests() for replica in pool]
    records = run_trainer(tmp_path / "two", settings, nproc=2)
    # both ranks' scoring calls were spread over both replicas
    assert all(replica.requests() > count for replica, count in zip(pool, before))
    assert sorted(losses(records)) == [1, 2]
    assert all(r["on_policy"] for r in records if "loss" in r)
    (checkpoint,) = checkpoint_dirs(tmp_path / "two")
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    first, second = state["rollout_generators"]
    assert not torch.equal(first, second)  # each rank drew its own samples

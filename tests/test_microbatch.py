"""The micro-batch builder, made of the config sections it reads (the method and rollout
sections, teacher.dtype and run.seed) and the run's objective, no whole run config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_trainer.config import MethodConfig, RolloutConfig, objective_from
from student_trainer.microbatch import MicroBatchBuilder
from student_trainer.student import load_student
from student_trainer.tasks import TASKS
from teacher_client import ScoreOptions
from tests.trainer_helpers import in_process

EXAMPLES = TASKS["addition"].splits(4, 1, 1, 0).train


@pytest.fixture(scope="module")
def student(student_model_dir):
    return load_student(student_model_dir, "float32", torch.device("cpu"))


def builder(student, teacher, method: MethodConfig, *, dtype="float32", seed=0, new_tokens=6):
    return MicroBatchBuilder(
        student,
        teacher,
        method,
        RolloutConfig(max_new_tokens=new_tokens),
        teacher_dtype=dtype,
        seed=seed,
        generator=torch.Generator().manual_seed(0),
        objective=objective_from(method),
    )


def test_a_distillation_micro_batch_is_scored_as_the_method_asks_in_teacher_dtype(student, backend):
    """method.top_k ids per completion position (the default loss asks for a top-k), the
    log-probs in teacher.dtype: what the teacher answers when asked directly for the built
    sequences."""
    teacher = in_process(backend)
    made = builder(student, teacher, MethodConfig(top_k=3), dtype="float16")
    item = made.build(EXAMPLES, on_policy=False, step=0, index=0)
    scored = item.scores.result()
    batch = item.batch
    asked = ScoreOptions(top_k=3, dtype="float16")
    direct = teacher.teacher.score(batch.sequences, batch.prompt_lens, asked)
    assert [len(r.target_logprobs) for r in scored] == [len(c) for c in batch.completions]
    for got, expected in zip(scored, direct):
        assert got.topk_ids.shape[1] == 3 and got.topk_logprobs.dtype == np.float16
        np.testing.assert_array_equal(got.topk_ids, expected.topk_ids)
        np.testing.assert_array_equal(got.target_logprobs, expected.target_logprobs)


def test_seqkd_completions_are_the_teachers_outputs_seeded_by_run_seed_step_and_index(
    student, backend
):
    teacher = in_process(backend)
    method = MethodConfig(name="seqkd", seqkd_temperature=1.0)

    def completions(seed: int, step: int, index: int) -> list[list[int]]:
        made = builder(student, teacher, method, seed=seed, new_tokens=6)
        return made.build(EXAMPLES, on_policy=False, step=step, index=index).batch.completions

    first = completions(0, 0, 0)
    assert completions(0, 0, 0) == first  # the same seed, step and index: the same outputs
    assert all(0 < len(c) <= 6 for c in first)  # rollout.max_new_tokens
    others = [completions(1, 0, 0), completions(0, 1, 0), completions(0, 0, 1)]
    assert all(other != first for other in others)

"""Small configs and a call-counting teacher for the trainer tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from student_trainer.config import TrainConfig, load_config
from student_trainer.teacher import LocalTeacher
from teacher_client import ScoreOptions
from teacher_service.in_process import InProcessTeacher


def small_config(out_dir: Path, student_dir: Path, *overrides: str) -> TrainConfig:
    """A few-second run: tiny batches, short rollouts, no periodic eval or saves."""
    return load_config(
        None,
        [
            f"student.model={student_dir}",
            f"run.out_dir={out_dir}",
            "teacher.address=unused:1",  # tests hand the trainer its teacher
            "run.progress=false",
            "run.eval_size=0",
            "run.eval_every=0",
            "run.save_every=0",
            "task.name=addition",
            "task.train_size=64",
            "optim.batch_size=4",
            "optim.steps=4",
            "optim.warmup_steps=1",
            "optim.lr=0.01",
            "rollout.max_new_tokens=6",
            *overrides,
        ],
    )


def in_process(backend) -> LocalTeacher:
    """The session's tiny teacher (an HFBackend) in this process, as the trainer sees it."""
    return LocalTeacher(InProcessTeacher(backend))


class SpyTeacher:
    """Passes every call to a real teacher (student_trainer.teacher.Teacher) and counts them."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.generated = inner, Counter(), []

    def submit_score(self, sequences, score_from, options: ScoreOptions, *, candidates=None):
        """Teacher.submit_score's own signature: a caller that strays from it fails here."""
        self.calls["score"] += 1
        return self.inner.submit_score(sequences, score_from, options, candidates=candidates)

    def generate(self, *args, **kwargs):
        self.calls["generate"] += 1
        out = self.inner.generate(*args, **kwargs)
        self.generated.append([o.token_ids for o in out])
        return out

    def check_tokenizer(self, tokenizer):
        return self.inner.check_tokenizer(tokenizer)

    def close(self) -> None:
        pass

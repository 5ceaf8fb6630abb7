"""Small configs and a call-counting teacher for the trainer tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from student_trainer.config import TrainConfig, load_config


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


class SpyTeacher:
    """Passes every call to a real teacher and counts them."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.generated = inner, Counter(), []
        self.runs_in_process = getattr(inner, "runs_in_process", False)

    def score(self, *args, **kwargs):
        self.calls["score"] += 1
        return self.inner.score(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self.calls["generate"] += 1
        out = self.inner.generate(*args, **kwargs)
        self.generated.append([o.token_ids for o in out])
        return out

    def check_tokenizer(self, tokenizer):
        return self.inner.check_tokenizer(tokenizer)

    def close(self) -> None:
        pass

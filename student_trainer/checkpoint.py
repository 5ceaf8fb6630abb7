"""Checkpoints that resume exactly, written atomically.

A checkpoint directory holds the student in save_pretrained form (loadable on its own
with from_pretrained; its generation config suppresses the padded output rows, see
padded_rows.py) plus `trainer_state.pt`: optimizer, scheduler, every random
stream, the step and the data position. It is assembled under a temporary name and
renamed into place, so a run killed mid-write never leaves a half checkpoint behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from student_trainer.chat_template import save_tokenizer
from student_trainer.padded_rows import mark_padded_rows

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(out_dir)
    return found[-1] if found else None


def resume_checkpoint(resume: str | None, out_dir: str | Path) -> Path | None:
    """What `--resume` names: a checkpoint directory, or "auto" for the latest one in
    out_dir (none yet: a fresh start); None starts fresh."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_checkpoint(out_dir)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", out_dir)
        return found
    return Path(resume)


def save_checkpoint(
    out_dir: str | Path, step: int, model: Any, tokenizer: Any, state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep` checkpoints."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    partial = root / f".partial-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    mark_padded_rows(model, tokenizer)
    model.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)  # LoRA: the adapters' save writes none
    save_tokenizer(tokenizer, partial)
    torch.save(state, partial / STATE_FILE)
    if final.exists():  # the same step saved again (e.g. a resumed run's last step)
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {checkpoint}: no {STATE_FILE} (not a checkpoint)")
    # our own file: it holds RNG states and python ints, so the full unpickler is needed
    return torch.load(path, map_location="cpu", weights_only=False)

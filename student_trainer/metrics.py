"""Where a run's numbers go: metrics.jsonl, TensorBoard when it is installed, and
Prometheus when run.metrics_port asks for it (prometheus_export.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from student_trainer.prometheus_export import PrometheusExport


class MetricsLog:
    """metrics.jsonl (one JSON object per step or evaluation), plus TensorBoard if installed,
    plus `prometheus` if given (the log closes it)."""

    def __init__(
        self, out_dir: Path, resumed_step: int, prometheus: PrometheusExport | None = None
    ) -> None:
        """`resumed_step` 0 starts the log afresh; N keeps what was logged up to step N."""
        self.prometheus = prometheus
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():  # drop what a crashed run logged past its last checkpoint
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and resumed_step > 0 and json.loads(line)["step"] <= resumed_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = self.path.open("a")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.prometheus is not None:
            self.prometheus.write(record)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.prometheus is not None:
            self.prometheus.close()

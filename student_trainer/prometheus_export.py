"""A run's numbers for Prometheus (run.metrics_port): what each step and evaluation record
holds, served at http://run.metrics_host:run.metrics_port/metrics while the run lasts, for
the trainer's Grafana dashboard (deploy/grafana/dashboards/student-trainer.json).

Each step's values are gauges (the latest step's), created by the first record that holds
them: a run without a teacher has no trainer_divergence, rather than one stuck at 0. Tokens
and steps are counters too, so a dashboard can take rate() over any window. Evaluations
land in trainer_eval{metric=...}.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from student_trainer.config import ConfigError

EVAL_PREFIX = "eval/"  # train.py's evaluation records: {"step": N, "eval/<metric>": value}
# step record key -> (gauge, help)
STEP_GAUGES = {
    "step": ("trainer_step", "Optimizer steps taken so far"),
    "loss": ("trainer_loss", "The last step's loss (per completion token)"),
    "divergence": ("trainer_divergence", "The last step's mean divergence to the teacher"),
    "tokens_per_s": ("trainer_tokens_per_second", "Completion tokens per second, last step"),
    "step_s": ("trainer_step_seconds", "The last step's duration"),
    "lr": ("trainer_learning_rate", "The learning rate the last step used"),
    "grad_norm": ("trainer_grad_norm", "The last step's gradient norm, before clipping"),
    "teacher_latency_s": (
        "trainer_teacher_latency_seconds",
        "The last step's teacher calls, submission to answer, summed over micro-batches",
    ),
    "teacher_wait_s": (
        "trainer_teacher_wait_seconds",
        "Of that, the time the step waited for the teacher (what overlap did not hide)",
    ),
    "hidden_fraction": (
        "trainer_teacher_hidden_fraction",
        "1 - wait / latency: the share of the teacher's latency hidden behind the student",
    ),
    "staleness": (
        "trainer_staleness_steps",
        "Optimizer steps between the weights that sampled the last step and those it trained",
    ),
    "reward": ("trainer_reward", "The last step's mean reward (RL + GKD only)"),
}


class PrometheusExport:
    """Serves a registry of this run's metrics over HTTP until close()."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.gauges: dict[str, Gauge] = {}
        self.tokens = Counter(
            "trainer_tokens", "Completion tokens trained on", registry=self.registry
        )
        self.steps = Counter(
            "trainer_steps",
            "Optimizer steps, on-policy (student samples) or not",
            ["on_policy"],
            registry=self.registry,
        )
        for on_policy in (True, False):
            self.steps.labels(_label(on_policy))
        self.evaluation = Gauge(
            "trainer_eval",
            "The latest evaluation's value of each metric (task score, divergences)",
            ["metric"],
            registry=self.registry,
        )
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as error:  # the port taken, an address not this host's
            raise ConfigError(
                f"run.metrics_port: cannot serve metrics on {host}:{port}: {error}"
            ) from None

    @property
    def port(self) -> int:
        return self.server.server_port

    def write(self, record: dict[str, Any]) -> None:
        """A step's record (train.py's Trainer.train_step) or an evaluation's."""
        evaluated = {k: v for k, v in record.items() if k.startswith(EVAL_PREFIX)}
        for key, value in evaluated.items():
            self.evaluation.labels(key.removeprefix(EVAL_PREFIX)).set(value)
        if evaluated:
            return
        for key, value in record.items():
            if key in STEP_GAUGES:
                self._gauge(key).set(value)
        self.tokens.inc(record["tokens"])
        self.steps.labels(_label(record["on_policy"])).inc()

    def _gauge(self, key: str) -> Gauge:
        if key not in self.gauges:
            name, help_text = STEP_GAUGES[key]
            self.gauges[key] = Gauge(name, help_text, registry=self.registry)
        return self.gauges[key]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _label(on_policy: bool) -> str:
    return "true" if on_policy else "false"

"""The trainer's Prometheus export (student_trainer/prometheus_export.py): what a scrape of
it reads back is what the records held; the port is checked and named when it is bad."""

from __future__ import annotations

import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from student_trainer.cli import _config, build_parser
from student_trainer.config import ConfigError, load_config
from student_trainer.prometheus_export import PrometheusExport

STEP = {
    "step": 3,
    "loss": 1.25,
    "on_policy": True,
    "staleness": 1,
    "tokens": 40,
    "lr": 0.001,
    "grad_norm": 0.5,
    "step_s": 2.0,
    "tokens_per_s": 20.0,
}
GKD = {"divergence": 0.75, "teacher_latency_s": 0.4, "teacher_wait_s": 0.1, "hidden_fraction": 0.75}


def scrape(export: PrometheusExport) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"http://127.0.0.1:{export.port}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@pytest.fixture
def export():
    running = PrometheusExport("127.0.0.1", 0)
    yield running
    running.close()


def test_a_scrape_reads_back_the_records(export):
    export.write({**STEP, **GKD})
    export.write({**STEP, "step": 4, "on_policy": False, "loss": 1.0, "tokens": 10, **GKD})
    export.write({"step": 4, "eval/metric": 12.5, "eval/divergence": 0.5})
    samples = scrape(export)
    assert samples[("trainer_step", ())] == 4
    assert samples[("trainer_loss", ())] == 1.0  # the latest step's
    assert samples[("trainer_tokens_total", ())] == 50  # both steps'
    assert samples[("trainer_steps_total", (("on_policy", "true"),))] == 1
    assert samples[("trainer_steps_total", (("on_policy", "false"),))] == 1
    assert samples[("trainer_teacher_hidden_fraction", ())] == 0.75
    assert samples[("trainer_staleness_steps", ())] == 1
    assert samples[("trainer_eval", (("metric", "metric"),))] == 12.5
    assert samples[("trainer_eval", (("metric", "divergence"),))] == 0.5


def test_values_a_run_never_records_have_no_series(export):
    export.write(STEP)  # sft: no teacher, no divergence
    names = {name for name, _ in scrape(export)}
    assert "trainer_loss" in names
    assert not names & {"trainer_divergence", "trainer_teacher_latency_seconds", "trainer_eval"}
    # steps of either kind are there from the start, at 0 until one is taken
    assert scrape(export)[("trainer_steps_total", (("on_policy", "false"),))] == 0


def test_a_taken_port_is_a_config_error_naming_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^run.metrics_port: .*127.0.0.1:{port}"):
            PrometheusExport("127.0.0.1", port)


def test_the_port_is_validated_and_the_cli_flag_sets_it():
    with pytest.raises(ConfigError, match=r"^run.metrics_port: 70000 is not a TCP port"):
        load_config(None, ["run.metrics_port=70000"])
    with pytest.raises(ConfigError, match=r"^run.metrics_host: "):
        load_config(None, ["run.metrics_host="])
    sft = ["--set", "method.name=sft"]  # no teacher needed
    flags = ["--set", "run.metrics_port=1", "--metrics-port", "9"]  # the flag wins
    args = build_parser().parse_args(["train", *sft, *flags])
    config = _config(args)
    assert (config.run.metrics_port, config.run.metrics_host) == (9, "127.0.0.1")
    assert load_config(None, ["method.name=sft"]).run.metrics_port == 0  # off unless asked for

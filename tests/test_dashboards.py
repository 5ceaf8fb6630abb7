"""The Grafana dashboards (deploy/grafana) against a real Prometheus scraping a real teacher
service and a real training run: every panel's query parses and returns data.

The service (`teacher-service serve`) and the trainer (`student-trainer train
--metrics-port`) run as processes, with the tiny models; Prometheus (Debian's, which
`make test` installs) runs docker/prometheus.yml with the targets on loopback and a 1 s
scrape interval. Grafana itself is not run: its variables are substituted as it would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from teacher_service.cli import free_port
from tests.test_compose import load_compose
from tests.test_kubernetes import find, render

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PROMETHEUS, PROMTOOL = Path("/usr/bin/prometheus"), Path("/usr/bin/promtool")
SCRAPE_SECONDS = 1
RATE_INTERVAL = "1m"  # $__rate_interval: several scrapes, the whole short run
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WAIT_S = 300  # for processes to start and data to arrive, on a loaded machine


# --- the dashboards' files ----------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows only group them), nested rows' included."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def substitute(expr: str, dashboard: dict[str, Any]) -> str:
    """Grafana's variables as it fills them in: $__rate_interval, and each query variable at
    its "All" value."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, variable in variables(dashboard).items():
        if variable["type"] == "query":
            expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", variable["allValue"], expr)
    assert "$" not in expr, f"a variable Grafana would fill is left in {expr!r}"
    return expr


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], substitute(target["expr"], dashboard))
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]


def test_there_are_the_two_dashboards():
    assert [path.name for path in DASHBOARDS] == ["student-trainer.json", "teacher-service.json"]
    assert len({load(path)["uid"] for path in DASHBOARDS}) == 2


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_queries_the_chosen_prometheus(path):
    dashboard = load(path)
    chosen = variables(dashboard)["datasource"]
    assert (chosen["type"], chosen["query"]) == ("datasource", "prometheus")
    shown = list(panels(dashboard))
    assert len(shown) >= 8
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in shown:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        assert panel["description"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds repeat"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()


def test_compose_and_kubernetes_load_the_same_files():
    """Compose mounts deploy/grafana where its provisioning looks; the Kubernetes render
    carries the files byte for byte in the sidecar's ConfigMap."""
    compose = load_compose(REPO / "docker-compose.yml", env={})["services"]
    grafana = compose["grafana"]
    assert grafana["profiles"] == ["metrics"] and ":" in grafana["image"]  # a pinned tag
    mounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in grafana["volumes"]}
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yaml").read_text())
    (files,) = provider["providers"]
    assert mounts[files["options"]["path"]] == GRAFANA / "dashboards"
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (source,) = sources["datasources"]
    prometheus_port = compose["prometheus"]["ports"][0].rsplit(":", 1)[-1]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    assert source["type"] == "prometheus" and source["isDefault"]

    configmap = find(render("base"), "ConfigMap", "grafana-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {path.name: path.read_text() for path in DASHBOARDS}


# --- against a real Prometheus ------------------------------------------------------------


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TEACHER_AUTH_TOKEN": ""}
    with log.open("w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(check, what: str, processes: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Poll `check` until it holds; fail at once, with its log, if a process exits."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        for name, (process, log) in processes.items():
            assert process.poll() is None, f"{name} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.5)


def responds(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def scrape_config(tmp_path: Path, targets: dict[str, str]) -> Path:
    """docker/prometheus.yml with its targets on loopback and a 1 s scrape interval."""
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    token = tmp_path / "teacher-token"
    token.write_text("none")  # compose's placeholder: the teacher runs without auth here
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        return reply.json()

    def holds(self, expr: str) -> bool:
        answer = self.query(expr)
        return answer["status"] == "success" and bool(answer["data"]["result"])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, tiny_model_dir, student_model_dir) -> Iterator[Prometheus]:
    if not (PROMETHEUS.is_file() and PROMTOOL.is_file()):
        pytest.fail("Debian's prometheus is not installed: `make system-packages` (make test)")
    tmp = tmp_path_factory.mktemp("dashboards")
    grpc_port, http_port, trainer_port, web_port = (free_port() for _ in range(4))
    python = sys.executable
    teacher = [python, "-m", "teacher_service", "serve", "--model", str(tiny_model_dir)]
    teacher += ["--host", "127.0.0.1", "--port", str(grpc_port), "--http-port", str(http_port)]
    teacher += ["--device", "cpu", "--dtype", "float32"]
    settings = {
        "student.model": student_model_dir,
        "teacher.address": f"127.0.0.1:{grpc_port}",
        "task.name": "addition",
        "task.train_size": 64,
        "optim.steps": 100_000,  # it runs until the test has what it needs
        "optim.batch_size": 4,
        "optim.warmup_steps": 1,
        "rollout.max_new_tokens": 6,
        "run.out_dir": tmp / "run",
        "run.eval_size": 2,  # one evaluation at step 0: the trainer_eval series
        "run.eval_every": 0,
        "run.save_every": 0,
        "run.progress": "false",
    }
    trainer = [python, "-m", "student_trainer", "train", "--metrics-port", str(trainer_port)]
    trainer += [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    config = scrape_config(
        tmp,
        {"teacher": f"127.0.0.1:{http_port}", "trainer": f"127.0.0.1:{trainer_port}"},
    )
    checked = subprocess.run([PROMTOOL, "check", "config", config], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    server = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
    server += [f"--web.listen-address=127.0.0.1:{web_port}"]

    processes: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, argv in (("teacher", teacher), ("prometheus", server)):
            processes[name] = (start(argv, tmp / f"{name}.log"), tmp / f"{name}.log")
        wait_until(
            lambda: responds(f"http://127.0.0.1:{http_port}/health"), "the teacher", processes
        )
        processes["trainer"] = (start(trainer, tmp / "trainer.log"), tmp / "trainer.log")
        wait_until(
            lambda: responds(f"http://127.0.0.1:{web_port}/-/ready"), "Prometheus", processes
        )
        client = Prometheus(f"http://127.0.0.1:{web_port}")
        # two scrapes of each side after trained steps and the teacher's answers to them
        for expr in (
            "count_over_time(trainer_staleness_steps[1m]) >= 2",
            'count_over_time(teacher_request_seconds_count{frontend="grpc",status="OK"}[1m]) >= 2',
        ):
            wait_until(lambda expr=expr: client.holds(expr), expr, processes)
        yield client
    finally:
        for process, _ in processes.values():
            stop(process)
        shutil.rmtree(tmp / "tsdb", ignore_errors=True)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_returns_data_from_a_real_prometheus(path, prometheus):
    empty, failed = [], []
    for title, expr in queries(load(path)):
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            failed.append(f"{title}: {expr}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            empty.append(f"{title}: {expr}")
    report = ["refused:", *failed, "without a series:", *empty]
    assert not failed and not empty, "\n".join(report)


def test_the_compose_scrape_config_passes_promtool():
    checked = subprocess.run(
        [PROMTOOL, "check", "config", "--syntax-only", REPO / "docker" / "prometheus.yml"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

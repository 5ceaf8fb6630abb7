"""docker-compose.yml and docker/ as users run them, without a Docker engine: the compose
files validate against the Compose specification; each service's own command runs as a
local process the way its container would (a smoke test of the whole stack); and the
Dockerfiles keep the promises users rely on (non-root, a health check, no baked-in models)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from student_trainer.checkpoint import checkpoint_dirs
from teacher_client.auth import bearer_metadata
from teacher_service.auth import read_token
from teacher_service.cli import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE, GPU_COMPOSE = REPO / "docker-compose.yml", REPO / "docker-compose.gpu.yml"
DOCKER = REPO / "docker"
TEACHER_DOCKERFILES = [DOCKER / "teacher.Dockerfile", DOCKER / "teacher-cuda.Dockerfile"]
DOCKERFILES = [*TEACHER_DOCKERFILES, DOCKER / "trainer.Dockerfile"]
TOKEN = "compose-smoke-token"


# --- reading the files ------------------------------------------------------------------


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} (all these files use), applied
    as Compose does: to the parsed file's string values, so `${VAR:-}` is "", not null."""

    def value(match: re.Match) -> str:
        name, operator, default = match.group(1), match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        return env.get(name, default)

    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", value, node)
    return node


def merge(base: Any, override: Any) -> Any:
    """`docker compose -f a -f b`: mappings merge key by key, anything else is replaced
    (enough for these files: the override replaces command and adds keys)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in {**base, **override}.items()}
    return override


def load_compose(*files: Path, env: Mapping[str, str] | None = None) -> dict:
    env = os.environ if env is None else env
    merged: dict = {}
    for path in files:
        merged = merge(merged, interpolate(yaml.safe_load(path.read_text()), env))
    return merged


def compose_schema_errors(document: dict) -> list[str]:
    """Errors against the Compose specification schema that check-jsonschema vendors."""
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = validator.iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Each build stage as (INSTRUCTION, arguments) pairs; continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if instruction and not instruction.startswith("#") and stages:
            stages[-1].append((instruction.upper(), " ".join(arguments.split())))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    _, _, command = healthcheck.partition(" CMD ")
    return json.loads(command)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def without(command: list[str], name: str) -> list[str]:
    at = command.index(name)
    return command[:at] + command[at + 2 :]


def container_ports(service: dict) -> set[str]:
    """The container side of `ports:` ("127.0.0.1:8000:8000" -> "8000")."""
    return {published.rsplit(":", 1)[-1] for published in service.get("ports", [])}


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --- the Compose specification -----------------------------------------------------------


@pytest.mark.parametrize(
    "files", [[COMPOSE], [GPU_COMPOSE], [COMPOSE, GPU_COMPOSE]], ids=["cpu", "gpu", "merged"]
)
def test_compose_files_follow_the_compose_specification(files):
    assert compose_schema_errors(load_compose(*files)) == []


def test_the_schema_check_rejects_a_broken_compose_file():
    broken = load_compose(COMPOSE)
    teacher = broken["services"]["teacher"]
    teacher["healtcheck"] = teacher.pop("healthcheck")  # a typo'd key
    broken["services"]["trainer"]["depends_on"]["teacher"]["condition"] = "healthy"
    errors = compose_schema_errors(broken)
    assert any("healtcheck" in e for e in errors), errors
    assert any("depends_on" in e for e in errors), errors


def test_gpu_variant_reserves_a_gpu_and_runs_the_cuda_image():
    teacher = load_compose(COMPOSE, GPU_COMPOSE)["services"]["teacher"]
    assert teacher["build"] == {"context": ".", "dockerfile": "docker/teacher-cuda.Dockerfile"}
    (device,) = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    gpu = teacher["command"]
    assert flag(gpu, "--device") == "cuda"
    cpu = load_compose(COMPOSE)["services"]["teacher"]["command"]
    for name in ("--device", "--dtype"):  # otherwise the same serve command
        gpu, cpu = without(gpu, name), without(cpu, name)
    assert gpu == cpu


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, GPU_COMPOSE]], ids=["cpu", "gpu"])
def test_teacher_and_trainer_get_cpus_of_their_own_that_their_threads_follow(files):
    """Each container's `cpus:` is a CPU quota, which causal_lm/threads.py sizes
    torch's pools to (rounded down: whole CPUs), so neither command may pass --threads.
    TEACHER_CPUS and TRAINER_CPUS set them."""
    services = load_compose(*files, env={})["services"]
    for name in ("teacher", "trainer"):
        cpus = float(services[name]["cpus"])
        assert cpus >= 1 and cpus == int(cpus), name
        assert "--threads" not in services[name]["command"], name
    sized = load_compose(*files, env={"TEACHER_CPUS": "6", "TRAINER_CPUS": "3"})["services"]
    assert (sized["teacher"]["cpus"], sized["trainer"]["cpus"]) == ("6", "3")


# --- the stack, run as local processes ----------------------------------------------------


class LocalStack:
    """What a container sees, mapped onto this machine: volume targets to host paths (a
    named volume to a temporary directory), service hostnames to 127.0.0.1, published
    container ports to free loopback ports, console scripts to this venv's."""

    def __init__(self, compose: dict, tmp: Path) -> None:
        self.tmp = tmp
        services = compose["services"]
        self.hosts = {*services, "0.0.0.0", "127.0.0.1", "localhost"}
        self.ports: dict[str, str] = {}
        self.paths = {"/app": REPO}  # the trainer image's WORKDIR holds a COPY of configs/
        for service in services.values():
            for published in service.get("ports", []):
                self.ports[published.rsplit(":", 1)[-1]] = str(free_port())
            for volume in service.get("volumes", []):
                source, target = volume.split(":")[:2]
                local = REPO / source if source.startswith(".") else tmp / "volumes" / source
                self.paths[target] = local

    def arg(self, value: str) -> str:
        if value == "0.0.0.0":
            return "127.0.0.1"
        if value in self.ports:
            return self.ports[value]
        host, colon, port = value.rpartition(":")
        if colon and host in self.hosts and port in self.ports:
            return f"127.0.0.1:{self.ports[port]}"
        for target in sorted(self.paths, key=len, reverse=True):
            if value == target or value.startswith(f"{target}/"):
                return f"{self.paths[target]}{value[len(target) :]}"
        return value

    def config(self, path: Path) -> Path:
        """A YAML config file the command reads, with the same mapping applied to its values."""

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            return self.arg(node) if isinstance(node, str) else node

        local = self.tmp / path.name
        local.write_text(yaml.safe_dump(walk(yaml.safe_load(path.read_text()))))
        return local

    def command(self, argv: list[str]) -> list[str]:
        local = [self.arg(str(item)) for item in argv]
        local = [
            str(self.config(Path(a))) if a.endswith(".yaml") and Path(a).is_file() else a
            for a in local
        ]
        return [str(Path(sys.executable).parent / local[0]), *local[1:]]

    def environment(self, service: dict) -> dict[str, str]:
        return {**os.environ, **{k: str(v) for k, v in service.get("environment", {}).items()}}


def wait_healthy(stack: LocalStack, teacher: dict, process: subprocess.Popen, log: Path) -> None:
    """Run the compose healthcheck's own command until it passes (depends_on:
    service_healthy), failing fast if the server exits."""
    kind, *check = teacher["healthcheck"]["test"]
    assert kind == "CMD"
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(stack.command(check), capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            assert done.stdout.strip().endswith("SERVING")
            return
        assert process.poll() is None, f"the teacher exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{done.stderr}\n{log.read_text()}"
        time.sleep(0.5)


@pytest.mark.parametrize(
    "files",
    [
        [COMPOSE],
        pytest.param(
            [COMPOSE, GPU_COMPOSE],
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
    ids=["cpu", "gpu"],
)
def test_the_compose_stack_trains_against_its_teacher(tmp_path, files):
    compose = load_compose(*files, env={**os.environ, "TEACHER_AUTH_TOKEN": TOKEN})
    services = {n: s for n, s in compose["services"].items() if not s.get("profiles")}
    assert set(services) == {"teacher", "trainer"}
    assert services["trainer"]["depends_on"]["teacher"]["condition"] == "service_healthy"
    stack = LocalStack(compose, tmp_path)
    teacher = services["teacher"]
    log_path = tmp_path / "teacher.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        stack.command(teacher["command"]),
        env=stack.environment(teacher),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(stack, teacher, process, log_path)
        trainer = services["trainer"]
        quick = {"optim.steps": 2, "optim.batch_size": 4, "rollout.max_new_tokens": 8}
        quick |= {"task.train_size": 64, "task.validation_size": 8, "task.test_size": 8}
        quick |= {"run.eval_size": 4, "run.eval_every": 0, "run.save_every": 0}
        quick |= {"teacher.connect_timeout_s": 30}
        overrides = [item for k, v in quick.items() for item in ("--set", f"{k}={v}")]
        done = subprocess.run(
            stack.command(trainer["command"]) + overrides,
            env=stack.environment(trainer),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        assert "trained to step 2" in done.stdout
        metrics_url = f"http://127.0.0.1:{stack.ports['8000']}/metrics"
        scraped = httpx.get(metrics_url, headers={"Authorization": f"Bearer {TOKEN}"})
        refused = httpx.get(metrics_url)  # the token really was required of the trainer
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    out = Path(yaml.safe_load((REPO / "configs" / "compose.yaml").read_text())["run"]["out_dir"])
    run = Path(stack.arg(str(out)))
    assert run.is_relative_to(tmp_path / "volumes" / "runs")  # the named volume
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002"]
    assert refused.status_code == 401 and scraped.status_code == 200
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }
    assert samples["teacher_tokens_scored_total"] > 0


def test_an_empty_token_means_no_auth(monkeypatch):
    """Compose passes TEACHER_AUTH_TOKEN: ${TEACHER_AUTH_TOKEN:-}, so unset arrives as ''."""
    environment = load_compose(COMPOSE, env={})["services"]["teacher"]["environment"]
    assert environment == {"TEACHER_AUTH_TOKEN": ""}
    monkeypatch.setenv("TEACHER_AUTH_TOKEN", "")
    assert read_token(None) == ""  # the server: no token, no interceptor or middleware
    assert bearer_metadata(os.environ["TEACHER_AUTH_TOKEN"]) is None  # the client sends none


# --- what the Dockerfiles promise ---------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_build_in_stages_and_run_as_a_non_root_user(path):
    stages = dockerfile_stages(path)
    assert len(stages) >= 2, "a builder stage and a slim runtime stage"
    users = instructions(stages[-1], "USER")
    assert users, "the runtime stage sets a USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    copied = [a for s in stages for a in instructions(s, "COPY") + instructions(s, "ADD")]
    assert not [a for a in copied if "models" in a.split()[:-1]], "models are mounted, not copied"
    assert "/models" in instructions(stages[-1], "VOLUME")[0]


@pytest.mark.parametrize("path", TEACHER_DOCKERFILES, ids=lambda p: p.name)
def test_teacher_images_check_health_as_compose_does(path):
    runtime = dockerfile_stages(path)[-1]
    command = healthcheck_command(runtime)
    assert command[:2] == ["teacher-service", "health"]
    teacher = load_compose(COMPOSE)["services"]["teacher"]
    assert teacher["healthcheck"]["test"] == ["CMD", *command]
    exposed = {port for ports in instructions(runtime, "EXPOSE") for port in ports.split()}
    served = teacher["command"]
    assert {flag(served, "--port"), flag(served, "--http-port")} == exposed
    assert container_ports(teacher) == exposed
    assert flag(command, "--address") == f"127.0.0.1:{flag(served, '--port')}"


def test_cpu_images_install_the_pinned_cpu_torch():
    pins = (REPO / "constraints.txt").read_text().splitlines()
    (pin,) = [line for line in pins if line.startswith("torch==")]
    for name in ("teacher.Dockerfile", "trainer.Dockerfile"):
        builder = dockerfile_stages(DOCKER / name)[0]
        assert f"TORCH_VERSION={pin.removeprefix('torch==')}" in instructions(builder, "ARG")
        runs = instructions(builder, "RUN")
        assert any("download.pytorch.org/whl/cpu" in r and "torch==" in r for r in runs)
        assert any("-c constraints.txt ." in r for r in runs)


def test_build_context_keeps_models_and_environments_out_but_what_images_copy_in():
    ignored = dockerignore()
    assert {"models", ".venv", ".git", ".cache", "runs"} <= set(ignored)
    for path in DOCKERFILES:
        for stage in dockerfile_stages(path):
            for arguments in instructions(stage, "COPY"):
                if arguments.startswith("--from"):
                    continue
                for source in arguments.split()[:-1]:
                    assert (REPO / source).exists(), f"{path.name}: COPY {source}: not in the repo"
                    assert source not in ignored, f"{path.name}: COPY {source}: in .dockerignore"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_every_package_that_pip_installs(path):
    """`pip install .` installs the packages pyproject.toml finds; one the builder did not
    COPY is silently missing from the image (the trainer's CLI imports distill_lab)."""
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in patterns}
    assert {"teacher_service", "student_trainer", "causal_lm", "distill_lab"} <= packages
    builder = dockerfile_stages(path)[0]
    copied = {a.split()[0] for a in instructions(builder, "COPY") if not a.startswith("--from")}
    assert packages <= copied, f"not copied: {sorted(packages - copied)}"


def test_trainer_image_holds_the_config_compose_names():
    services = load_compose(COMPOSE)["services"]
    config = flag(services["trainer"]["command"], "--config")
    runtime = dockerfile_stages(DOCKER / "trainer.Dockerfile")[-1]
    (workdir,) = instructions(runtime, "WORKDIR")
    copied = [a.split()[-1] for a in instructions(runtime, "COPY") if not a.startswith("--from")]
    assert any(config.startswith(f"{workdir}/{target}/") for target in copied)
    settings = yaml.safe_load((REPO / config.removeprefix(f"{workdir}/")).read_text())
    host, port = settings["teacher"]["address"].split(":")
    assert host == "teacher" and port in container_ports(services["teacher"])


def test_prometheus_scrapes_the_teachers_http_port_with_its_token():
    compose = load_compose(COMPOSE)
    teacher, prometheus = compose["services"]["teacher"], compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["metrics"]
    mounted = {v.split(":")[1]: REPO / v.split(":")[0] for v in prometheus["volumes"]}
    scrape = yaml.safe_load(mounted["/etc/prometheus/prometheus.yml"].read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == {"teacher", "trainer"}
    job = jobs["teacher"]
    assert job["static_configs"][0]["targets"] == [
        f"teacher:{flag(teacher['command'], '--http-port')}"
    ]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    token_file = job["authorization"]["credentials_file"]
    (config,) = prometheus["configs"]
    assert config["target"] == token_file
    with_token = load_compose(COMPOSE, env={"TEACHER_AUTH_TOKEN": "secret"})
    assert with_token["configs"][config["source"]] == {"content": "secret"}
    # Compose leaves an empty `content` out, and then no file would be mounted at all
    assert load_compose(COMPOSE, env={})["configs"][config["source"]]["content"]


def test_prometheus_scrapes_the_trainers_metrics_port():
    compose = load_compose(COMPOSE)
    trainer = compose["services"]["trainer"]
    port = flag(trainer["command"], "--metrics-port")
    assert container_ports(trainer) == {port}
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "trainer"]
    assert job["static_configs"][0]["targets"] == [f"trainer:{port}"]
    # it listens beyond the container's loopback, where Prometheus's container reaches it
    settings = yaml.safe_load((REPO / "configs" / "compose.yaml").read_text())
    assert settings["run"]["metrics_host"] == "0.0.0.0"


@pytest.mark.parametrize(
    "files, service, path",
    [
        ([COMPOSE], "teacher", DOCKER / "teacher.Dockerfile"),
        ([COMPOSE, GPU_COMPOSE], "teacher", DOCKER / "teacher-cuda.Dockerfile"),
        ([COMPOSE], "trainer", DOCKER / "trainer.Dockerfile"),
    ],
    ids=["teacher", "teacher-cuda", "trainer"],
)
def test_plain_docker_run_does_what_compose_runs(files, service, path):
    """An image's default CMD is its compose command, so `docker run IMAGE` behaves alike."""
    (command,) = instructions(dockerfile_stages(path)[-1], "CMD")
    compose = load_compose(*files)["services"][service]
    assert compose["build"]["dockerfile"] == str(path.relative_to(REPO))
    assert json.loads(command) == compose["command"]


@pytest.mark.parametrize("doc", ["README.md", "docs/deployment-compose.md"])
def test_the_docs_compose_instructions_match_the_files(doc):
    """Every `docker compose` line names files, profiles and services that exist, and the
    ports and model the prose promises are the ones the teacher publishes and serves."""
    text = (REPO / doc).read_text()
    compose = load_compose(COMPOSE, env={})
    services = set(compose["services"])
    commands = re.findall(r"^docker compose .*$", text, flags=re.MULTILINE)
    assert commands, f"{doc} has no docker compose instructions"
    for line in commands:
        files = re.match(r"docker compose ((?:-f \S+ )*)", line).group(1)
        for name in files.split()[1::2]:
            assert (REPO / name).is_file(), f"{doc}: {line!r} names a missing {name}"
        for profile in re.findall(r"--profile (\S+)", line):
            assert any(profile in s.get("profiles", []) for s in compose["services"].values())
        words = line.split("#")[0].split()
        if words[2] in ("logs", "exec", "run", "cp") and len(words) > 3:
            named = [w.split(":")[0] for w in words[3:] if w.split(":")[0] in services]
            assert named, f"{doc}: {line!r} names no service of docker-compose.yml"
    teacher = compose["services"]["teacher"]
    for published in teacher["ports"]:
        host = published.rsplit(":", 1)[0]
        assert f"`{host}`" in text, f"{doc} does not say the teacher publishes {host}"
    model = flag(teacher["command"], "--model").removeprefix("/models/")
    assert f"models/{model}" in text


def test_the_compose_trainer_runs_the_demo_with_container_paths():
    """configs/compose.yaml is configs/demo.yaml but for where things are in a container
    (and no progress bars in logs): the two cannot drift apart unnoticed."""
    from student_trainer.config import load_config, to_dict

    demo = to_dict(load_config(REPO / "configs" / "demo.yaml"))
    compose = to_dict(load_config(REPO / "configs" / "compose.yaml"))
    container_keys = {
        ("student", "model"),
        ("teacher", "address"),
        ("run", "out_dir"),
        ("run", "progress"),
        ("run", "metrics_host"),
    }
    differ = {
        (section, key)
        for section, values in demo.items()
        for key, value in values.items()
        if compose[section][key] != value
    }
    assert differ == container_keys
    assert compose["student"]["model"] == "/models/" + demo["student"]["model"].split("models/")[1]

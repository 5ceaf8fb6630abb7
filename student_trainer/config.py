"""Training configuration: dataclasses, loaded from YAML plus `--set section.key=value`.

Every key has a default, so a config file only names what it changes. Unknown keys and
bad values are refused with a ConfigError that names the key (`method.lmbda`, ...).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from teacher_client.objectives import Objective

log = logging.getLogger(__name__)

METHODS = ("sft", "seqkd", "gkd")
FILE_TASK = "file"  # task.name for the user's own data files (user_data.py)
TASK_FORMATS = ("auto", "prompt", "prompt_completion", "messages")
SCHEDULES = ("cosine", "linear", "constant")
AUTOCASTS = ("none", "bf16", "fp16")
# completion rows whose logits the loss holds at once: 512 x 152k float32 is 311 MB per
# tensor, a few of which (log_softmax, divergence, their gradients) exist together
DEFAULT_LOSS_CHUNK_ROWS = 512
PEFT_INSTALL = "pip install 'teacher-service[lora]' (or: pip install peft)"


class ConfigError(ValueError):
    """A bad configuration; the message starts with the offending key."""


@dataclass
class LoraConfig:
    """student.lora: train low-rank adapters (peft) instead of every weight (lora.py)."""

    r: int = 0  # the adapters' rank; 0 = no LoRA, every parameter is trained
    alpha: float = 16.0  # the adapters' output is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input while training
    # "all-linear" (every linear layer but the output layer) or comma-separated module
    # names, e.g. "q_proj,k_proj,v_proj,o_proj" (Llama's attention projections)
    target_modules: str = "all-linear"


@dataclass
class StudentConfig:
    model: str = "models/translation/student"  # a local directory (from_pretrained)
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    dtype: str = "float32"  # weights are trained in this dtype
    # the loss computes the student's logits this many completion rows at a time (and
    # again in the backward): memory O(rows x vocabulary); 0 = all rows at once
    loss_chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS
    lora: LoraConfig = field(default_factory=LoraConfig)
    # recompute each decoder layer's activations in the backward instead of keeping them
    gradient_checkpointing: bool = False
    # the training forward and loss under torch.autocast: none | bf16 | fp16 (CUDA only,
    # with a GradScaler); weights and optimizer stay in student.dtype (precision.py)
    autocast: str = "none"


@dataclass
class TeacherConfig:
    address: str = ""  # the teacher service, host:port (e.g. 127.0.0.1:50051)
    in_process: str = ""  # a model directory: run the teacher in this process instead
    # the in-process teacher's batch-invariant scores (a service: `serve --deterministic`):
    # a sequence's log-probs do not depend on the micro-batch it is scored in
    deterministic: bool = False
    # per call, retries included: also how long a teacher outage (every replica gone) is
    # waited out; past it the run writes a checkpoint and stops (exit status 3)
    timeout_s: float = 300.0
    connect_timeout_s: float = 120.0  # how long to wait for the service at startup
    dtype: str = "float32"  # wire dtype of the teacher's log-probs
    # TLS to the service: on when tls or any file is set (the bearer token, if the service
    # wants one, comes from $TEACHER_AUTH_TOKEN: secrets stay out of config files)
    tls: bool = False
    tls_ca: str = ""  # verify the service against this CA (system roots if empty)
    tls_cert: str = ""  # mutual TLS: this client's certificate chain ...
    tls_key: str = ""  # ... and its key


@dataclass
class TaskConfig:
    # translation, arithmetic, records (tasks.py), addition (tests), or file: your own data
    name: str = "translation"
    train_size: int = 2000  # the built-in tasks' split sizes (a file's records are all used)
    validation_size: int = 64
    test_size: int = 64
    seed: int = 0  # the dataset's own seed (splits), independent of run.seed
    # task.name=file (user_data.py): JSONL, JSON, Parquet, CSV or a save_to_disk directory
    train_file: str = ""
    validation_file: str = ""  # held-out prompts; or a fraction of train_file:
    validation_fraction: float = 0.0  # ... held out at random (task.seed), in [0, 1)
    test_file: str = ""  # for `student-trainer eval --split test`
    format: str = "auto"  # auto | prompt | prompt_completion | messages (TRL's formats)
    metric: str = ""  # module:function(predictions, references) -> float | dict (user_metric.py)


@dataclass
class MethodConfig:
    """What the student learns from (GKD paper, Algorithm 1; docs/design.md "Loss semantics")."""

    name: str = "gkd"  # sft | seqkd | gkd
    lmbda: float = 1.0  # gkd: probability that a step trains on student samples
    # the distillation loss, by its registered name (teacher_client/objectives.py):
    # forward_kl | reverse_kl | jsd | sampled_rkl | yours; "" = jsd (or the deprecated keys')
    loss: str = ""
    # the loss's own keys, e.g. method.loss_args.beta=0.9 for jsd (support: topk | full)
    loss_args: dict[str, Any] = field(default_factory=dict)
    beta: float | None = None  # deprecated: method.loss (forward_kl, reverse_kl, jsd + beta)
    support: str | None = None  # deprecated: method.loss_args.support, method.loss=sampled_rkl
    top_k: int = 64  # teacher top-k per position for a topk support
    student_candidates: int = 0  # also score the student's own top-m ids (union support)
    temperature: float = 1.0  # distillation temperature (teacher and student)
    alpha: float = 1.0  # RL + GKD: loss weight of the divergence; 1 = pure GKD
    reward: str = "exact_match"  # reward function for alpha < 1
    samples_per_prompt: int = 1  # group size for the reward's group-mean baseline
    seqkd_temperature: float = 0.0  # teacher sampling temperature for seqkd (0 greedy)


@dataclass
class RolloutConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # sample (and score) step t + k while step t trains, from weights k steps old; 0: exact
    # on-policy, each step samples with the weights it trains (rollout_queue.py)
    max_staleness: int = 0


@dataclass
class OptimConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant, after the linear warmup
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    eval_every: int = 50  # steps; 0 = only at the start and the end
    eval_size: int = 32  # validation prompts per evaluation
    save_every: int = 50  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    progress: bool = True
    # serve the run's numbers for Prometheus at http://metrics_host:metrics_port/metrics
    # (rank 0; prometheus_export.py); 0 = off. 0.0.0.0 in a container, for its scraper
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


@dataclass
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def uses_teacher(self) -> bool:
        return self.method.name != "sft"


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check a YAML value against the field's type (ints are accepted for floats; None for
    an optional field)."""
    options = typing.get_args(kind)
    if type(None) in options:  # `float | None`: unset (None), or a float
        if value is None:
            return None
        (kind,) = [option for option in options if option is not type(None)]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")


def _apply(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {sorted(current.__dict__)}")
            _apply(current, value, f"{key}.")
        elif isinstance(current, dict):  # free-form keys (method.loss_args): merged, checked later
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            setattr(target, name, {**current, **value})
        else:
            setattr(target, name, _coerce(key, value, hints[name]))


def _parse_override(item: str) -> dict[str, Any]:
    """`method.lmbda=0.5` -> {"method": {"lmbda": 0.5}} (the value is parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. method.lmbda=0.5")
    nested: dict[str, Any] = {}
    node = nested
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then each `--set` in order; validated."""
    config = TrainConfig()
    if path is not None:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(config, values)
    for item in overrides:
        _apply(config, _parse_override(item))
    validate(config)
    return config


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(config: TrainConfig) -> None:
    """Refuse values that would train something other than what was asked."""
    from student_trainer.tasks import REWARDS, TASKS

    m, o, r = config.method, config.optim, config.rollout
    _require(m.name in METHODS, "method.name", f"{m.name!r} is not one of {METHODS}")
    _require(0.0 <= m.lmbda <= 1.0, "method.lmbda", f"{m.lmbda} is outside [0, 1]")
    objective = objective_from(m)  # the loss and its keys (method.temperature, top_k, ...)
    deprecated = deprecation(m)
    if deprecated:
        warnings.warn(deprecated, DeprecationWarning, stacklevel=3)
        log.warning(deprecated)
    _require(0.0 <= m.alpha <= 1.0, "method.alpha", f"{m.alpha} is outside [0, 1]")
    _require(m.seqkd_temperature >= 0, "method.seqkd_temperature", "must be >= 0")
    _require(m.samples_per_prompt >= 1, "method.samples_per_prompt", "must be >= 1")
    _require(m.reward in REWARDS, "method.reward", f"{m.reward!r} is not one of {list(REWARDS)}")
    if objective.on_policy_only:
        _require(
            m.lmbda == 1.0,
            "method.lmbda",
            f"loss {objective.name} needs student samples on every step: 1.0",
        )
    if m.alpha < 1.0:
        _require(
            m.name == "gkd" and m.lmbda == 1.0,
            "method.alpha",
            "RL + GKD (alpha < 1) needs on-policy samples: method.name=gkd, lmbda=1",
        )
    if m.samples_per_prompt > 1:
        _require(
            m.name == "gkd" and m.lmbda == 1.0,
            "method.samples_per_prompt",
            "several samples per prompt need on-policy steps (gkd, lmbda=1)",
        )
    _require(r.temperature > 0, "rollout.temperature", f"{r.temperature} must be > 0")
    _require(0.0 < r.top_p <= 1.0, "rollout.top_p", f"{r.top_p} is outside (0, 1]")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _require(r.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
    if r.max_staleness > 0:
        # the policy-gradient terms assume the samples come from the weights being trained
        estimator = f"loss {objective.name}" if objective.on_policy_only else "RL + GKD"
        _require(
            not objective.on_policy_only and m.alpha == 1.0,
            "rollout.max_staleness",
            f"{estimator} is a policy-gradient estimator that needs samples from the weights "
            "being trained (no importance correction): use 0",
        )
    _require(o.steps >= 1, "optim.steps", "must be >= 1")
    _require(o.batch_size >= 1, "optim.batch_size", "must be >= 1")
    _require(o.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    _require(o.lr > 0, "optim.lr", "must be > 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} not in {SCHEDULES}")
    _require(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
    names = [*TASKS, FILE_TASK]
    _require(config.task.name in names, "task.name", f"{config.task.name!r} not in {names}")
    _require(config.task.train_size >= 1, "task.train_size", "must be >= 1")
    _validate_task_files(config.task)
    _require(config.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
    _require(config.run.eval_size >= 0, "run.eval_size", "must be >= 0")
    port = config.run.metrics_port
    _require(0 <= port <= 65535, "run.metrics_port", f"{port} is not a TCP port (0: off)")
    _require(bool(config.run.metrics_host), "run.metrics_host", "must name an address")
    _require(
        config.student.dtype in ("float32", "bfloat16", "float16"),
        "student.dtype",
        "must be float32, bfloat16 or float16",
    )
    _require(config.student.loss_chunk_rows >= 0, "student.loss_chunk_rows", "must be >= 0")
    validate_student(config.student)
    _require(
        config.teacher.dtype in ("float32", "bfloat16", "float16"),
        "teacher.dtype",
        "must be float32, bfloat16 or float16",
    )
    _require(config.teacher.timeout_s > 0, "teacher.timeout_s", "must be > 0")
    _require(config.teacher.connect_timeout_s > 0, "teacher.connect_timeout_s", "must be > 0")
    if config.uses_teacher:
        _require(
            bool(config.teacher.address or config.teacher.in_process),
            "teacher.address",
            f"method {m.name} needs a teacher (address or in_process)",
        )


DEPRECATED_LOSS_KEYS = ("beta", "support")


def objective_from(method: MethodConfig) -> Objective:
    """The run's distillation loss: method.loss built with method.loss_args and the shared
    keys (method.temperature, top_k, student_candidates), or the loss the deprecated
    method.beta / method.support select. A bad name or value is a ConfigError naming its
    key (`method.loss`, `method.loss_args.beta`, `method.top_k`, ...)."""
    from teacher_client.objectives import SHARED_KEYS, make_objective

    name, own, legacy = _loss_choice(method)
    for key in own:  # the keys every loss shares are method keys of their own
        _require(
            key not in SHARED_KEYS,
            f"method.loss_args.{key}",
            f"every loss shares it: set method.{key}",
        )
    shared = {key: getattr(method, key) for key in SHARED_KEYS}
    try:
        return make_objective(name, **shared, **own)
    except ValueError as error:
        key, sep, why = str(error).partition(": ")
        if not sep or " " in key:  # a loss's check that does not start with its key
            key, why = "loss", f"{name}: {error}"
        if key != "loss" and key not in SHARED_KEYS and not legacy:
            key = f"loss_args.{key}"
        raise ConfigError(f"method.{key}: {why}") from None


def deprecation(method: MethodConfig) -> str | None:
    """What to say when the deprecated method.beta / method.support choose the loss: the
    keys that replace them (e.g. "method.beta=1 is deprecated: use method.loss=reverse_kl")."""
    old = [f"method.{key}={_shown(getattr(method, key))}" for key in _deprecated_keys(method)]
    if not old:
        return None
    name, own = _legacy_loss(method)
    new = [f"method.loss={name}", *(f"method.loss_args.{k}={_shown(v)}" for k, v in own.items())]
    verb = "is" if len(old) == 1 else "are"
    return f"{', '.join(old)} {verb} deprecated: use {', '.join(new)}"


def _deprecated_keys(method: MethodConfig) -> list[str]:
    return [key for key in DEPRECATED_LOSS_KEYS if getattr(method, key) is not None]


def _loss_choice(method: MethodConfig) -> tuple[str, dict[str, Any], bool]:
    """(loss name, its own keys, whether the deprecated keys chose them)."""
    deprecated = _deprecated_keys(method)
    if not deprecated:
        return method.loss or "jsd", dict(method.loss_args), False
    _require(
        not (method.loss or method.loss_args),
        f"method.{deprecated[0]}",
        "deprecated, and method.loss / method.loss_args are set too: give the loss and its "
        "keys there only (e.g. method.loss_args.beta for jsd)",
    )
    name, own = _legacy_loss(method)
    return name, own, True


def _legacy_loss(method: MethodConfig) -> tuple[str, dict[str, Any]]:
    """The loss and keys method.beta and method.support meant (unset: 0.5 and topk, their
    old defaults): support=sampled is sampled_rkl (reverse KL only), beta 0 forward_kl,
    beta 1 reverse_kl, any other beta jsd; support topk | full is the loss's own key."""
    beta = 0.5 if method.beta is None else method.beta
    support = "topk" if method.support is None else method.support
    if support == "sampled":
        _require(beta == 1.0, "method.beta", "support=sampled estimates reverse KL: beta=1")
        return "sampled_rkl", {}
    own: dict[str, Any] = {} if method.support is None else {"support": support}
    if beta == 0.0:
        return "forward_kl", own
    if beta == 1.0:
        return "reverse_kl", own
    return "jsd", own if method.beta is None else {"beta": beta, **own}


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def validate_student(s: StudentConfig) -> None:
    """LoRA, gradient checkpointing and autocast: what makes a larger student fit."""
    lora = s.lora
    _require(lora.r >= 0, "student.lora.r", f"{lora.r} must be >= 0 (0: no LoRA)")
    if lora.r > 0:
        _require(lora.alpha > 0, "student.lora.alpha", f"{lora.alpha} must be > 0")
        _require(0 <= lora.dropout < 1, "student.lora.dropout", f"{lora.dropout} not in [0, 1)")
        names = [n.strip() for n in lora.target_modules.split(",")]
        _require(
            all(names),
            "student.lora.target_modules",
            f"{lora.target_modules!r}: 'all-linear' or comma-separated module names",
        )
        _require(
            importlib.util.find_spec("peft") is not None,
            "student.lora.r",
            f"LoRA needs peft, which is not installed: {PEFT_INSTALL}",
        )
    _require(s.autocast in AUTOCASTS, "student.autocast", f"{s.autocast!r} not in {AUTOCASTS}")
    if s.autocast == "fp16":
        _require(
            not s.device.startswith("cpu"),
            "student.autocast",
            "fp16 autocast needs CUDA (a GradScaler on a GPU); on CPU use bf16 or none",
        )
        _require(
            s.dtype != "float16" or lora.r > 0,
            "student.autocast",
            "fp16 autocast scales float32 gradients: student.dtype=float32 (or bfloat16), "
            "not float16 (LoRA adapters are float32 whatever the dtype)",
        )


def _validate_task_files(task: TaskConfig) -> None:
    """The file task's keys (the files themselves are read, and checked record by record,
    when training or evaluation starts: user_data.py)."""
    from student_trainer.user_metric import load_metric

    file_keys = ("train_file", "validation_file", "test_file", "metric")
    if task.name != FILE_TASK:
        for name in file_keys:
            _require(not getattr(task, name), f"task.{name}", "is read only with task.name=file")
        _require(task.format == "auto", "task.format", "is read only with task.name=file")
        _require(
            task.validation_fraction == 0,
            "task.validation_fraction",
            "is read only with task.name=file (the built-in tasks: task.validation_size)",
        )
        return
    _require(
        bool(task.train_file),
        "task.train_file",
        "task.name=file needs a file of prompts (JSONL, JSON, Parquet, CSV or a directory "
        "written by datasets' save_to_disk)",
    )
    _require(task.format in TASK_FORMATS, "task.format", f"{task.format!r} not in {TASK_FORMATS}")
    fraction = task.validation_fraction
    _require(0.0 <= fraction < 1.0, "task.validation_fraction", f"{fraction} is outside [0, 1)")
    _require(
        not (task.validation_file and fraction > 0),
        "task.validation_fraction",
        "give either task.validation_file or a fraction of task.train_file, not both",
    )
    if task.metric:
        try:
            load_metric(task.metric)
        except ValueError as error:
            raise ConfigError(f"task.metric: {error}") from None


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)

"""A distillation loss as one object, chosen by name (needs torch, like losses.py).

An Objective says what to ask the teacher at every completion position (`support`: its
top-k plus one tail bucket, the whole vocabulary, or the sampled token alone; `top_k`, the
student's own candidates, the temperature: `score_options`), computes the per-token loss
to differentiate and the per-token divergence to report (`token_losses`), and checks its
own keys (`check`). The trainer (student_trainer: `method.loss` names one, `method.loss_args`
holds its own keys), the trainer's evaluation and the TRL adapter (teacher_client.trl) all
take one, so that a new loss is one class in one file, registered by name:

    @register_loss("skew_kl")
    @dataclass(frozen=True)
    class SkewKL(Objective):
        skew: float = 0.1  # its own key: method.loss_args.skew

        def token_losses(self, logits, targets, teacher):
            ...  # [n, V] logits, [n] targets, TeacherRows of those n rows -> ([n], [n])

Built in, numerically those the trainer always had: `forward_kl`, `reverse_kl` and `jsd`
(the generalized JSD of the GKD paper on the top-k + tail support or the whole vocabulary,
teacher_client/losses.py), and `sampled_rkl` (the sampled-token reverse-KL estimator, trained
through its policy-gradient surrogate). docs/design.md, "Loss semantics", says what each
computes.

Like losses.py it lives in the client distribution, so that a trainer in another framework
trains on the very objects ours does; nothing in teacher_client/__init__.py imports it
(the client itself stays torch-free).
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from teacher_client.losses import (
    generalized_jsd,
    policy_gradient_loss,
    sampled_reverse_kl,
    sparse_generalized_jsd,
)
from teacher_client.messages import ScoreOptions, ScoreResult

# what the teacher returns per position: its top-k (+ the student's candidates) and a tail
# bucket for the rest | all V log-probs | the sampled token's log-prob only
SUPPORTS = ("topk", "full", "sampled")


@dataclass
class TeacherRows:
    """The teacher's signal for N completion positions, one row each, concatenated over the
    sequences in order (the order of the student's completion rows)."""

    target_logprobs: Tensor  # [N]: log p(y) of the token at the position (always returned)
    support_ids: Tensor | None  # [N, k + m] int64: top-k ids, then candidate ids (topk)
    support_logprobs: Tensor | None  # [N, k + m]: their log-probs (topk)
    full_logprobs: Tensor | None  # [N, V]: every log-prob (full)

    @classmethod
    def from_results(
        cls, results: list[ScoreResult], candidates: list[Tensor] | None = None
    ) -> TeacherRows:
        """The rows of every sequence's ScoreResult, in order, as float32 tensors; with the
        student's `candidates` (one [T_i, m] tensor of ids per sequence) appended to the
        top-k support, their log-probs to the top-k log-probs."""

        def cat(name: str) -> Tensor | None:
            parts = [getattr(r, name) for r in results]
            if parts[0] is None:
                return None
            return torch.from_numpy(np.concatenate(parts)).float()

        target, full = cat("target_logprobs"), cat("full_logprobs")
        ids, logprobs = cat("topk_ids"), cat("topk_logprobs")
        if ids is not None:
            ids = ids.long()
        if candidates is not None:
            cand_ids, cand_lp = torch.cat(candidates), cat("candidate_logprobs")
            ids = cand_ids if ids is None else torch.cat([ids, cand_ids], dim=-1)
            logprobs = cand_lp if logprobs is None else torch.cat([logprobs, cand_lp], dim=-1)
        return cls(target, ids, logprobs, full)

    def columns(self) -> list[Tensor | None]:
        """The fields in order, each [N, ...] or None: what a per-row map splits."""
        return [getattr(self, f.name) for f in fields(self)]

    def to(self, device: torch.device) -> TeacherRows:
        return TeacherRows(*(None if t is None else t.to(device) for t in self.columns()))


def scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """[n, V] logits in float32, divided by the distillation temperature."""
    return logits.float() / temperature


def target_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log q(y) [n] of rows of logits [n, V] at `temperature`, for the targets [n], in float32."""
    log_q = torch.log_softmax(scaled_logits(logits, temperature), dim=-1)
    return log_q.gather(-1, targets[:, None]).squeeze(-1)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclass(frozen=True)
class Objective:
    """A distillation loss with its keys: the three every loss shares (fields here), and its
    own (the fields of its subclass, e.g. jsd's `beta`). Frozen, and checked when built.

    `support` (a class attribute; a loss with a `support` key makes it a field) says what
    the teacher is asked for; `on_policy_only` marks a policy-gradient estimator, whose
    samples must come from the weights being trained. Subclasses implement `token_losses`
    and extend `check` with their own keys; `register_loss` makes them choosable by name.
    """

    # distillation temperature: the teacher scores at it, the student's logits are divided by it
    temperature: float = 1.0
    top_k: int = 64  # the teacher's k most likely tokens per position (support topk)
    student_candidates: int = 0  # also score the student's own top-m ids (topk: union support)

    name: ClassVar[str] = ""  # the registered name (register_loss sets it)
    support: ClassVar[str] = "topk"  # topk (+ tail bucket) | full | sampled (SUPPORTS)
    on_policy_only: ClassVar[bool] = False  # needs samples of the weights being trained

    def __post_init__(self) -> None:
        self.check()

    @property
    def candidates(self) -> int:
        """How many of the student's own top ids per position join the teacher's top-k
        (the union support); 0 unless the support is topk."""
        return self.student_candidates if self.support == "topk" else 0

    def score_options(self, dtype: str = "float32") -> ScoreOptions:
        """What to ask the teacher for at every scored position, log-probs in `dtype`."""
        return ScoreOptions(
            top_k=self.top_k if self.support == "topk" else 0,
            full=self.support == "full",
            temperature=self.temperature,
            dtype=dtype,
        )

    def check(self) -> None:
        """Raise ValueError("<key>: why") for a bad value. A loss with keys of its own
        extends it (and calls super().check())."""
        _require(self.temperature > 0, "temperature", f"{self.temperature} must be > 0")
        _require(self.top_k >= 1, "top_k", f"{self.top_k} must be >= 1")
        _require(self.student_candidates >= 0, "student_candidates", "must be >= 0")
        _require(self.support in SUPPORTS, "support", f"{self.support!r} is not one of {SUPPORTS}")

    def token_losses(
        self, logits: Tensor, targets: Tensor, teacher: TeacherRows
    ) -> tuple[Tensor, Tensor]:
        """(loss [n] to differentiate, divergence [n] to report, detached) at n positions.

        logits: [n, V] the student's raw logits there (any float dtype; not yet divided by
        the temperature); targets: [n] the token at each position; teacher: the teacher's
        rows for those n positions, holding what `support` asks for (the log-probs at
        `temperature` already). Each row is independent of the others: the trainer calls
        this a chunk of rows at a time.
        """
        raise NotImplementedError(f"{type(self).__name__}.token_losses")


SHARED_KEYS = tuple(f.name for f in fields(Objective))  # temperature, top_k, student_candidates
LossClass = TypeVar("LossClass", bound=type[Objective])
_LOSSES: dict[str, type[Objective]] = {}


def register_loss(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator: make an Objective subclass (a frozen dataclass: put it above
    @dataclass) the loss called `name`, for `make_objective` and `method.loss`."""

    def register(cls: LossClass) -> LossClass:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"register_loss({name!r}): {cls!r} is not an Objective subclass")
        known = _LOSSES.get(name)
        # the same class again (its module imported anew) replaces itself; another may not
        if known is not None and _qualified(known) != _qualified(cls):
            raise ValueError(f"loss: {name!r} is registered already ({known.__qualname__})")
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return register


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def loss_names() -> list[str]:
    """Every registered loss, sorted."""
    return sorted(_LOSSES)


def loss_keys(name: str) -> list[str]:
    """The keys of loss `name` beyond the SHARED_KEYS."""
    return [f.name for f in fields(_loss_class(name)) if f.name not in SHARED_KEYS]


def make_objective(name: str, **keys: Any) -> Objective:
    """The loss registered as `name`, built from `keys` (shared and its own) and checked.

    Raises ValueError naming the offender first: "loss: ..." for an unknown name (listing
    the known ones), "<key>: ..." for an unknown key, a value of the wrong type (ints pass
    for floats) or one its `check` refuses.
    """
    cls = _loss_class(name)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    typed = {}
    for key, value in keys.items():
        if key not in known:
            raise ValueError(
                f"{key}: not a key of loss {name} (its own: {loss_keys(name) or 'none'}; "
                f"every loss's: {list(SHARED_KEYS)})"
            )
        typed[key] = _typed(key, value, hints[key])
    return cls(**typed)


def _loss_class(name: str) -> type[Objective]:
    """The class registered as `name`; `module:name` imports `module` first (its
    `@register_loss` runs then), so a command line can name a loss of the user's own module
    as task.metric names a metric."""
    module, sep, registered = name.rpartition(":")
    if sep:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"loss: {name!r}: cannot import {module!r} ({error})") from None
        name = registered
    if name not in _LOSSES:
        raise ValueError(f"loss: {name!r} is not a registered loss (known: {loss_names()})")
    return _LOSSES[name]


def _typed(key: str, value: Any, kind: Any) -> Any:
    """`value` as the key's declared type: plain types are checked (an int is a float, a
    bool is no number), others left to the loss's check."""
    if kind is float and type(value) is int:
        return float(value)
    if kind in (bool, int, float, str) and type(value) is not kind:
        raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class GeneralizedJSD(Objective):
    """The generalized JSD(beta) between teacher p and student q at temperature t, per
    position: beta = 0 is forward KL(p||q) (mode covering), beta = 1 reverse KL(q||p) (mode
    seeking), in between beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q (GKD
    paper Eq. 1, TRL's convention). On the topk support it is exact on the teacher's top-k
    (+ the student's candidates) plus one tail bucket holding the rest of both
    distributions (losses.sparse_generalized_jsd); on full, over the whole vocabulary.
    """

    support: str = "topk"  # topk (+ tail bucket) | full (the teacher's whole rows)
    beta: ClassVar[float] = 0.5  # a key of jsd's own; fixed for forward_kl, reverse_kl

    def check(self) -> None:
        _require(
            self.support in ("topk", "full"), "support", f"{self.support!r} is not topk or full"
        )
        super().check()

    def token_losses(
        self, logits: Tensor, targets: Tensor, teacher: TeacherRows
    ) -> tuple[Tensor, Tensor]:
        # the teacher's log-probs come at the temperature already: only the student's
        # logits are divided by it
        student = scaled_logits(logits, self.temperature)  # [n, V] float32
        if self.support == "full":
            value = generalized_jsd(student, teacher.full_logprobs, self.beta)  # [n]
        else:
            value = sparse_generalized_jsd(
                student, teacher.support_ids, teacher.support_logprobs, self.beta
            )  # [n]
        return value, value.detach()


@register_loss("forward_kl")
@dataclass(frozen=True)
class ForwardKL(GeneralizedJSD):
    """KL(p||q): the generalized JSD at beta = 0."""

    beta: ClassVar[float] = 0.0


@register_loss("reverse_kl")
@dataclass(frozen=True)
class ReverseKL(GeneralizedJSD):
    """KL(q||p): the generalized JSD at beta = 1."""

    beta: ClassVar[float] = 1.0


@register_loss("jsd")
@dataclass(frozen=True)
class JSD(GeneralizedJSD):
    """The generalized JSD at any beta in [0, 1] (the default loss, at 0.5)."""

    beta: float = 0.5  # 0 forward KL, 1 reverse KL, between: the generalized JSD

    def check(self) -> None:
        super().check()
        _require(0.0 <= self.beta <= 1.0, "beta", f"{self.beta} is outside [0, 1]")  # and NaN


@register_loss("sampled_rkl")
@dataclass(frozen=True)
class SampledReverseKL(Objective):
    """KL(q||p) estimated from the sampled token alone: log q(y) - log p(y) for y ~ q.

    It needs only the teacher's log-prob of the token (the cheapest signal, Tinker /
    MiniLLM): unbiased, but high variance. The estimate is what it reports; what it
    differentiates is the policy-gradient surrogate with advantage -(log q(y) - log p(y)),
    whose expected gradient is that of KL(q||p) (the score-function term; the direct term
    has zero expectation). So y must be sampled from the student being trained, at the
    temperature: on-policy steps only (lmbda = 1, no stale samples).
    """

    support: ClassVar[str] = "sampled"
    on_policy_only: ClassVar[bool] = True

    def token_losses(
        self, logits: Tensor, targets: Tensor, teacher: TeacherRows
    ) -> tuple[Tensor, Tensor]:
        log_q = target_logprobs(logits, targets, self.temperature)  # [n]
        estimate = sampled_reverse_kl(log_q, teacher.target_logprobs).detach()  # [n]
        return policy_gradient_loss(log_q, -estimate), estimate

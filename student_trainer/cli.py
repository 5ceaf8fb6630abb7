"""`student-trainer`: train a student against the teacher service, evaluate one, export a
checkpoint as a plain model (LoRA adapters merged), or build the built-in tasks' models
(pretrain) and small random ones (tiny-model)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from distill_lab.tiny_model import TinyModelSpec
from student_trainer.config import FILE_TASK, ConfigError, load_config

EXIT_CONFIG = 2  # a config error, bad data, a missing file
EXIT_TEACHER_OUTAGE = 3  # the teacher was out of reach past teacher.timeout_s (checkpointed)

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
EPILOG = """exit status: 0 done; 2 a config error, bad data or a missing file (one line,
`student-trainer: ...`, naming the key, file or record); 3 the teacher service stayed
unreachable past teacher.timeout_s (one line naming the checkpoint of the last completed
step that was written, and the --resume that continues from it)."""


def _config(args: argparse.Namespace):
    overrides = list(args.set or [])
    if getattr(args, "metrics_port", None) is not None:  # train's shorthand, applied last
        overrides.append(f"run.metrics_port={args.metrics_port}")
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from student_trainer.distributed import from_environment
    from student_trainer.train import train

    with logging_redirect_tqdm():  # warnings (a teacher outage waited out) above the bar
        result = train(_config(args), resume=args.resume)
    if not from_environment().is_main:  # under torchrun, rank 0 speaks for the run
        return
    print(f"trained to step {result.steps}; metrics in {result.out_dir / 'metrics.jsonl'}")
    if result.evaluations:
        print(json.dumps(result.evaluations[-1]))


def _eval(args: argparse.Namespace) -> None:
    from student_trainer.checkpoint import load_state
    from student_trainer.evaluate import evaluate_split

    config = _config(args)
    step = int(load_state(args.checkpoint)["step"]) if args.checkpoint else 0
    size = config.run.eval_size
    if config.task.name == FILE_TASK:  # counted first: a missing split fails before loading
        from student_trainer.user_data import split_size

        prompts = min(size, split_size(config.task, args.split))
    else:
        prompts = min(size, getattr(config.task, f"{args.split}_size"))
    scores = evaluate_split(config, args.split, checkpoint=args.checkpoint, size=size)
    print(json.dumps({"step": step, "split": args.split, "prompts": prompts, **scores}))


def _export(args: argparse.Namespace) -> None:
    from student_trainer.student import export_student

    out = export_student(args.checkpoint, args.out_dir, args.dtype, args.base, args.trim_vocab)
    print(f"wrote {args.checkpoint} as a plain transformers model to {out}")


def _pretrain(args: argparse.Namespace) -> None:
    from distill_lab.models import pretrain

    for role in args.role:
        out = pretrain(
            args.task, role, root=args.models_dir, runs_dir=args.runs_dir, overrides=args.set or []
        )
        print(f"{args.task} {role}: {out}")


def _tiny_model(args: argparse.Namespace) -> None:
    from distill_lab.tiny_model import build_tiny_model

    spec = TinyModelSpec(**{f.name: getattr(args, f.name) for f in fields(TinyModelSpec)})
    out = build_tiny_model(args.out_dir, spec, tokenizer_from=args.tokenizer_from)
    print(f"wrote a tiny Llama model and its BPE tokenizer to {out}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description and epilog as written; every flag's help shows its default."""


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its help and default; --log-level before or after the command."""
    parser = argparse.ArgumentParser(
        prog="student-trainer", description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter
    )
    # WARNING: teacher_client's lines while it waits out a teacher outage show
    parser.add_argument(
        "--log-level", default="WARNING", choices=LOG_LEVELS, help="logging threshold"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    threads = argparse.ArgumentParser(add_help=False)  # every command runs torch
    threads.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch's and the tokenizers' threads; 0: $TEACHER_THREADS, else "
        "$OMP_NUM_THREADS, else the CPUs the affinity mask and the cgroup CPU quota allow",
    )

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, parents=[threads], formatter_class=HelpFormatter
        )
        sub.add_argument(  # after the command too; not given there: the one before it
            "--log-level",
            default=argparse.SUPPRESS,
            choices=LOG_LEVELS,
            help=f"logging threshold (default: {parser.get_default('log_level')})",
        )
        return sub

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument(
            "--config",
            help="YAML file (sections: student, teacher, task, "
            "method, rollout, optim, run); defaults for anything not given",
        )
        sub.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one key, e.g. --set method.loss_args.beta=0.9 (repeatable)",
        )
        return sub

    train = with_config("train", "train a student (GKD, SFT, SeqKD, RL + GKD)")
    train.add_argument(
        "--resume",
        metavar="auto|CHECKPOINT",
        help="continue from a checkpoint dir, or 'auto': the latest in run.out_dir",
    )
    train.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the run's metrics for Prometheus on this port (GET /metrics, on "
        "run.metrics_host, 127.0.0.1 unless set): --set run.metrics_port=PORT",
    )
    train.set_defaults(run=_train)
    evaluate = with_config("eval", "evaluate the student: task metric and divergence to teacher")
    evaluate.add_argument("--checkpoint", help="a checkpoint dir; None: student.model")
    evaluate.add_argument(
        "--split",
        default="validation",
        choices=["validation", "test"],
        help="scored on its first run.eval_size prompts (--set run.eval_size=N for more)",
    )
    evaluate.set_defaults(run=_eval)
    export = command(
        "export",
        "write a checkpoint as a plain transformers model directory: a LoRA run's "
        "adapters merged into its base weights (AutoModelForCausalLM loads it, no peft)",
    )
    export.add_argument("checkpoint", help="a checkpoint dir (runs/NAME/checkpoints/step-N)")
    export.add_argument("out_dir", help="where the model and its tokenizer are written")
    export.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the exported weights' dtype",
    )
    export.add_argument(
        "--base",
        help="a LoRA checkpoint's base model dir; None: the one the checkpoint names",
    )
    export.add_argument(
        "--trim-vocab",
        action="store_true",
        help="cut the embeddings and output layer to the tokenizer's size, so no padded row "
        "exists (default: off; the rows are kept and the generation config suppresses them)",
    )
    export.set_defaults(run=_export)
    pretrain = command(
        "pretrain", "train a built-in task's teacher or student from random weights (SFT)"
    )
    pretrain.add_argument(
        "--task",
        required=True,
        default=argparse.SUPPRESS,
        help="translation, arithmetic or records",
    )
    pretrain.add_argument(
        "--role",
        action="append",
        required=True,
        default=argparse.SUPPRESS,
        help="which model (repeatable): teacher or student; for records teacher, "
        "student-small, student-medium, student-large; writes models/TASK/ROLE",
    )
    pretrain.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of configs/pretrain/TASK-ROLE.yaml (repeatable)",
    )
    pretrain.add_argument("--models-dir", type=Path, default="models", help="output root")
    pretrain.add_argument(
        "--runs-dir", type=Path, default="runs/pretrain", help="training runs go here"
    )
    pretrain.set_defaults(run=_pretrain)
    tiny = command(
        "tiny-model", "write a small random-weight Llama + BPE tokenizer (tests, smoke runs)"
    )
    tiny.add_argument("out_dir", help="where the model and its tokenizer are written")
    for f in fields(TinyModelSpec):  # a flag per field: a field added later gets one too
        kind = type(f.default)
        typed = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        tiny.add_argument(
            f"--{f.name.replace('_', '-')}", default=f.default, help=f.metadata["help"], **typed
        )
    tiny.add_argument(
        "--tokenizer-from",
        type=Path,
        help="reuse this model directory's tokenizer (a student must share its teacher's); "
        "None: train a new one",
    )
    tiny.set_defaults(run=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from transformers.utils import logging as transformers_logging

    from causal_lm.threads import configure_threads
    from student_trainer.teacher import TeacherOutage

    transformers_logging.disable_progress_bar()
    try:
        try:
            configure_threads(args.threads)
        except ValueError as error:  # --threads -1, TEACHER_THREADS=many
            raise ConfigError(str(error)) from None
        args.run(args)
    except ConfigError as error:
        # a bad record (user_data.DataError) names its file, line and field itself
        kind = "bad data" if type(error).__name__ == "DataError" else "config error"
        print(f"student-trainer: {kind}: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except FileNotFoundError as error:
        print(f"student-trainer: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except TeacherOutage as error:  # a checkpoint was written: --resume continues
        print(f"student-trainer: teacher unavailable: {error}", file=sys.stderr)
        raise SystemExit(EXIT_TEACHER_OUTAGE) from None

"""Every command the docs quote runs: `teacher-service ...`, `student-trainer ...` and
`python -m ...` of either (or of the paper table) parse with the CLI's own parser, flags
spelled out; `--set` keys name real config keys; `make TARGET` names a Makefile target.

Commands are read from README.md and docs/*.md, in shell code blocks (line continuations
joined) and inline code; env-var prefixes, `$VAR`s, `[optional]` brackets and wrappers
(docker compose, kubectl exec --, torchrun -m) are handled as a shell would read them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from distill_lab.paper_table.__main__ import build_parser as paper_table_parser
from student_trainer.cli import build_parser as trainer_parser
from student_trainer.config import TrainConfig
from teacher_client.objectives import loss_keys, loss_names
from teacher_service.cli import build_parser as teacher_parser
from tests.parsers import exact

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "teacher-service": teacher_parser,
    "student-trainer": trainer_parser,
}
MODULES = {
    "teacher_service": teacher_parser,
    "student_trainer": trainer_parser,
    "distill_lab.paper_table": paper_table_parser,
}
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
SEPARATORS = {";", "&", "&&", "|", "||", "(", ")"}


def quoted_shell(text: str) -> Iterator[tuple[int, str]]:
    """(line, shell text) of each shell code block's lines and each inline code span."""
    prose = text
    for block in re.finditer(r"^ *```(\w*)\n(.*?)^ *```", text, re.M | re.S):
        prose = prose.replace(block[0], "\n" * block[0].count("\n"))  # keeps line numbers
        if block[1] not in SHELL_BLOCKS:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", first
        for offset, line in enumerate(block[2].split("\n")):
            start = start if pending else first + offset
            if line.endswith("\\"):  # continued on the next line: one command
                pending += line[:-1] + " "
            else:
                yield start, pending + line
                pending = ""
    for span in re.finditer(r"`([^`]+)`", prose):
        yield text.count("\n", 0, span.start()) + 1, span[1].replace("\n", " ")


def simple_commands(shell: str) -> Iterator[list[str]]:
    """The words of each simple command: split at ; & | ( ) and after a word ending in a
    comma (a list in prose), `[optional]` brackets unwrapped, `...` (and so on) dropped
    unless it stands for a flag's value."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote: prose, not a command
        return
    command: list[str] = []
    for word in [*words, ";"]:
        if word != "..." or (command[-1:] and command[-1].startswith("--")):
            command.append(word.removeprefix("[").removesuffix("]").removesuffix(","))
        if word in SEPARATORS or word.endswith(","):
            if command[:-1]:
                yield command[:-1] if word in SEPARATORS else command
            command = []


def invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(program or module, its argv) when `words` runs one of ours (or make)."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value before the command
    if not words:
        return None
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] in MODULES:
            return words[i + 1], words[i + 2 :]
    wrapped = words[0] == "docker"
    for i, word in enumerate(words):
        first = i == 0 or words[i - 1] == "--" or wrapped
        if first and Path(word).name in (*PROGRAMS, "make"):
            return Path(word).name, words[i + 1 :]
    return None


def config_key_error(item: str) -> str | None:
    """Why `--set KEY=VALUE` names no TrainConfig key (values may be placeholders); under
    method.loss_args, a key of some registered loss."""
    node: object = TrainConfig()
    key = item.partition("=")[0]
    for part in key.split("."):
        if isinstance(node, dict):  # method.loss_args: the loss's own keys
            names = {k for name in loss_names() for k in loss_keys(name)}
            return None if part in names else f"--set {key}: no such config key"
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            return f"--set {key}: no such config key"
        node = getattr(node, part)
    return None


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w.-]*):(?!=)", text, re.M))


def problem(program: str, argv: list[str]) -> str | None:
    """Why this invocation would fail, or None."""
    if program == "make":
        targets = makefile_targets()
        for word in argv:
            if word.startswith("-"):
                return f"{word} is not a make target (make takes no flags from the docs)"
            if "=" not in word and word not in targets:
                return f"no Makefile target {word!r}"
        return None
    parser = exact((PROGRAMS | MODULES)[program]())
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit as exited:
        if exited.code == 0:  # --help
            return None
        error = stderr.getvalue().strip().splitlines()[-1]
        mention = not any(word.startswith("-") for word in argv)  # `student-trainer export`
        return None if mention and "arguments are required" in error else error
    if getattr(args, "command", None) in ("train", "eval", "pretrain"):
        return next(filter(None, map(config_key_error, args.set or [])), None)
    return None


def documented_commands(path: Path) -> Iterator[tuple[int, str, str, list[str]]]:
    for line, shell in quoted_shell(path.read_text()):
        for words in simple_commands(shell):
            found = invocation(words)
            if found:
                yield line, shell.strip(), *found


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_documented_command_parses(doc):
    broken = [
        f"{doc.name}:{line}: {shell}\n    {why}"
        for line, shell, program, argv in documented_commands(doc)
        if (why := problem(program, argv))
    ]
    assert not broken, "\n".join(broken)


def test_the_docs_quote_commands_of_every_kind():
    """The reader finds them all: if it stopped recognising a kind, nothing would be checked."""
    found = {program for doc in DOCS for _, _, program, _ in documented_commands(doc)}
    assert found == {*PROGRAMS, "make", "student_trainer", "distill_lab.paper_table"}


def test_a_broken_command_is_caught(tmp_path):
    doc = tmp_path / "bad.md"
    doc.write_text(
        "Run `make paper-table --report-only`, then:\n\n```bash\n"
        "TOKEN=x .venv/bin/teacher-service serve --model m \\\n  --max-batch-tokenz 9 &\n"
        "student-trainer train --set method.bta=0.5 && make nope\n"
        "student-trainer train --set method.loss_args.bta=0.5\n"
        "docker compose run --rm trainer student-trainer train --resum auto\n"
        "kubectl delete job student-trainer --ignore-not-found  # a job's name, not a run\n"
        "```\n\nand `teacher-service health [--address 127.0.0.1:50051]` is fine.\n"
    )
    problems = [
        (program, problem(program, argv)) for _, _, program, argv in documented_commands(doc)
    ]
    assert problems == [
        ("teacher-service", "teacher-service: error: unrecognized arguments: --max-batch-tokenz 9"),
        ("student-trainer", "--set method.bta: no such config key"),
        ("make", "no Makefile target 'nope'"),
        ("student-trainer", "--set method.loss_args.bta: no such config key"),
        ("student-trainer", "student-trainer: error: unrecognized arguments: --resum auto"),
        ("make", "--report-only is not a make target (make takes no flags from the docs)"),
        ("teacher-service", None),
    ]  # fmt: skip

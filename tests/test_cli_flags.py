"""Both CLIs explain themselves: every flag has help and shows its default; `serve`'s
flags are generated from ServerConfig / Limits, so a field cannot lack one; a bad value is
refused naming its flag; --log-level goes before or after the command."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from student_trainer.cli import build_parser as trainer_parser
from teacher_service import cli
from teacher_service.config import Limits, ServerConfig, option
from teacher_service.flags import add_flags, config_from_args

ROOT = Path(__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def help_entries(parser: argparse.ArgumentParser, monkeypatch) -> dict[str, str]:
    """`--flag` -> its help text in --help, wrapped lines joined (for each spelling)."""
    monkeypatch.setenv("COLUMNS", "2000")  # one line per entry, or two when the flag is long
    entries: dict[str, list[str]] = {}
    current: list[str] = []
    for line in parser.format_help().splitlines():
        entry = re.match(r"  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if entry:
            current = [entry[2]] if entry[2] else []
            entries.update((flag, current) for flag in re.findall(r"--[a-z0-9-]+", entry[1]))
        elif line.startswith("    ") and entries:
            current.append(line.strip())
    return {flag: " ".join(lines) for flag, lines in entries.items()}


def serve_parser() -> argparse.ArgumentParser:
    return subcommands(cli.build_parser())["serve"]


def test_every_config_field_has_a_flag_with_help_and_its_default_shown(monkeypatch):
    entries = help_entries(serve_parser(), monkeypatch)
    # the flags that predate the rule (--name-in-kebab-case, a bool as --name/--no-name)
    renamed = {"max_message_bytes": "--max-message-mb", "auth_token": "--auth-token-file"}
    renamed["pack"] = "--packing"
    shown = {"max_message_bytes": str(Limits().max_message_bytes // 2**20), "auth_token": "None"}
    for cls in (ServerConfig, Limits):
        for field in dataclasses.fields(cls):
            if field.name == "limits":
                continue
            flag = renamed.get(field.name, "--" + field.name.replace("_", "-"))
            assert flag in entries, f"{cls.__name__}.{field.name} has no {flag}"
            entry = entries[flag]
            if field.name == "model":
                assert "(default:" not in entry  # required: no default to show
                continue
            default = shown.get(field.name, None if field.default == "" else field.default)
            assert entry.endswith(f"(default: {default})"), entry
            assert len(entry) > len(f"(default: {default})") + 10, entry  # a description
            if isinstance(field.default, bool):
                assert entries["--no-" + flag[2:]] == entry


def test_existing_flags_keep_their_meaning(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    seen: list[ServerConfig] = []
    monkeypatch.setattr("teacher_service.server.serve", seen.append)
    cli.main(["serve", "--model", "m"])
    cli.main(
        ["serve", "--model", "m", "--no-grpc", "--http-port", "0", "--no-share-prefixes",
         "--no-packing", "--no-warm-up", "--no-freeze-heap", "--full-logits",
         "--max-message-mb", "8", "--auth-token-file", str(token), "--max-batch-tokens",
         "77", "--device-map", "auto", "--upstream", ""]
    )  # fmt: skip
    default, flagged = seen
    assert default == ServerConfig(model="m")
    assert (default.http_port, default.device_map, default.upstream) == (None, "", "")
    assert flagged.grpc is False and flagged.http_port == 0
    assert not (flagged.share_prefixes or flagged.pack or flagged.warm_up or flagged.freeze_heap)
    assert flagged.full_logits and flagged.device_map == "auto"
    assert flagged.limits.max_message_bytes == 8 * 1024 * 1024
    assert flagged.limits.max_batch_tokens == 77 and flagged.auth_token == "s3cret"


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--score-chunk-mb", "0"], "argument --score-chunk-mb: score_chunk_mb must be >= 1"),
        (["--max-batch-tokens", "0"], "argument --max-batch-tokens: max_batch_tokens must"),
        (["--max-message-mb", "0"], "argument --max-message-mb: max_message_bytes must"),
        (["--worker-nice", "20"], "argument --worker-nice: worker_nice must be in [0, 19]"),
        (["--http-port", "70000"], "argument --http-port: http_port must be in"),
        (["--auth-token-file", "{missing}"], "argument --auth-token-file: [Errno 2]"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--tls-cert", "a.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_a_bad_value_exits_2_naming_the_flag(monkeypatch, capsys, tmp_path, flags, named):
    monkeypatch.setattr("teacher_service.server.serve", pytest.fail)  # never reached
    flags = [flag.format(missing=tmp_path / "nope") for flag in flags]
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--model", "m", *flags])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: teacher-service serve") and "Traceback" not in error
    assert f"teacher-service serve: error: {named}" in error


def test_flags_named_in_the_configs_errors_exist():
    """config.py's checks over several fields name their flags in prose: they must be real."""
    tree = ast.parse((ROOT / "teacher_service" / "config.py").read_text())
    raised = [node.exc for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc]
    text = " ".join(
        node.value
        for exc in raised
        for node in ast.walk(exc)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    )
    named = set(re.findall(r"--[a-z][a-z0-9-]*", text))
    assert {"--upstream", "--tls-cert", "--device-map"} <= named  # the scan sees them
    options = {s for a in serve_parser()._actions for s in a.option_strings}
    assert named <= options, named - options


@dataclasses.dataclass(frozen=True)
class Inner:
    """A nested section."""

    depth: float = option(1.5, "how deep")


@dataclasses.dataclass(frozen=True)
class Later:
    """A config as another branch may grow it: each new field gets its flag unasked."""

    name: str = dataclasses.field(metadata={"help": "required: no default"})
    threads: int = option(0, "torch threads; 0: all cores")
    port: int | None = option(None, "None: off")
    loud: bool = option(True, "speak up")
    inner: Inner = Inner()

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


def test_a_field_added_later_gets_its_flag(monkeypatch):
    parser = argparse.ArgumentParser(prog="later", formatter_class=cli.HELP)
    add_flags(parser, Later)

    def build(*argv: str) -> Later:
        return config_from_args(parser, Later, parser.parse_args(argv))

    assert build("--name", "x") == Later(name="x")
    expected = Later(name="x", threads=4, port=7, loud=False, inner=Inner(depth=0.25))
    argv = ["--name", "x", "--threads", "4", "--port", "7", "--no-loud", "--depth", "0.25"]
    assert build(*argv) == expected
    with pytest.raises(SystemExit) as exited:
        build("--name", "x", "--threads", "-1")
    assert exited.value.code == 2
    assert help_entries(parser, monkeypatch)["--threads"].endswith(
        "torch threads; 0: all cores (default: 0)"
    )


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for name, build in (("teacher-service", cli.build_parser), ("student-trainer", trainer_parser)):
        parser = build()
        found.append((name, parser))
        found += [(f"{name} {sub}", p) for sub, p in subcommands(parser).items()]
    return found


@pytest.mark.parametrize("name, parser", all_parsers(), ids=[n for n, _ in all_parsers()])
def test_every_flag_has_help_and_shows_its_default(monkeypatch, name, parser):
    entries = help_entries(parser, monkeypatch)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        entry = entries[action.option_strings[-1]]
        assert action.help, f"{name} {action.option_strings} has no help"
        if not action.required:
            assert re.search(r"\(default: [^)]*\)$", entry), entry


@pytest.mark.parametrize(
    "build, argv, level",
    [
        (cli.build_parser, ["serve", "--model", "m"], "INFO"),
        (cli.build_parser, ["--log-level", "DEBUG", "serve", "--model", "m"], "DEBUG"),
        (cli.build_parser, ["serve", "--model", "m", "--log-level", "ERROR"], "ERROR"),
        (cli.build_parser, ["health", "--log-level", "WARNING"], "WARNING"),
        (trainer_parser, ["train"], "WARNING"),
        (trainer_parser, ["--log-level", "INFO", "train"], "INFO"),
        (trainer_parser, ["train", "--set", "a.b=1", "--log-level", "DEBUG"], "DEBUG"),
        (
            trainer_parser,
            ["--log-level", "INFO", "tiny-model", "x", "--log-level", "ERROR"],
            "ERROR",
        ),
    ],
)
def test_log_level_goes_before_or_after_the_command(build, argv, level):
    assert build().parse_args(argv).log_level == level


def test_the_api_docs_table_names_every_serve_flag_with_its_default():
    """docs/api.md's table of serve's flags: every flag is in it, and a number or `literal`
    in its default column is the parser's default ("off", "none": unset)."""
    rows = [r.split("|")[1:3] for r in (ROOT / "docs" / "api.md").read_text().splitlines()]
    table = {}
    for flags, defaults in (r for r in rows if len(r) == 2 and r[0].strip().startswith("`--")):
        named = re.findall(r"--[a-z0-9-]+", flags)
        parts = defaults.split(" / ") if " / " in defaults else [defaults] * len(named)
        table.update((flag, default.strip()) for flag, default in zip(named, parts))
    parser = serve_parser()
    for action in parser._actions:
        flags = [f for f in action.option_strings if f not in ("-h", "--help", "--log-level")]
        if not flags or action.required:
            continue
        documented = [f for f in flags if f in table]
        assert documented, f"{flags} is not in docs/api.md's table"
        shown = re.match(r"`?([\w.:$]+)`?", table[documented[0]] or "off")[1]
        if re.fullmatch(r"\d+(\.\d+)?", shown):
            assert float(shown) == action.default, (flags, shown, action.default)
        elif shown not in ("off", "none"):
            assert shown in (action.default, "$TEACHER_AUTH_TOKEN"), (flags, shown)
        else:
            assert action.default in (None, True, False), (flags, shown)

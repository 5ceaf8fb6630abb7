"""Command-line parsers held to what manifests and docs must do: spell every flag out."""

from __future__ import annotations

import argparse


def exact(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser and its subcommands', refusing abbreviations (`--resum` for `--resume`)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                exact(sub)
    return parser

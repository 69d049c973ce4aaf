"""Every `retroserve` command's --help renders (argparse formats help strings with %)."""

from __future__ import annotations

import argparse

import pytest

from server.cli.main import build_parser


def _commands(parser: argparse.ArgumentParser, prefix=()):
    """(words, parser) for the parser and every subcommand under it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, prefix + (name,))


@pytest.mark.parametrize("words", [words for words, _ in _commands(build_parser())], ids=" ".join)
def test_help_renders(words, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*words, "--help"])
    assert done.value.code == 0
    assert "usage: " in capsys.readouterr().out

"""Every `flashdmd ... --help` ends with an example of that command, each example is a command the parser accepts,
and every long-running command has --no-progress."""
import argparse
import shlex

import pytest

from flashdmd.cli import EXAMPLES, _subparsers, build_parser

PARSER = build_parser()
COMMANDS = [(" ".join(words), p) for words, p in _subparsers(PARSER)]


def test_every_command_is_listed():
    names = {name for name, _ in COMMANDS}
    assert {"", "info", "distill", "sample", "make-reals", "export", "eval", "eval-stats", "plan", "report", "demo",
            "config-help", "reward make-pairs", "reward train", "world pretrain"} <= names
    assert set(EXAMPLES) == names   # no example for a command that is gone


@pytest.mark.parametrize("name,parser", COMMANDS, ids=[n or "flashdmd" for n, _ in COMMANDS])
def test_help_ends_with_an_example_of_the_command(name, parser):
    lines = parser.format_help().rstrip().splitlines()
    last = lines[-1].strip()
    head = next(i for i in range(len(lines) - 1, -1, -1) if not lines[i].startswith("  "))
    assert lines[head] in ("example:", "examples:"), lines[-4:]
    assert lines[head - 1] == "", "the examples are a paragraph of their own"
    for example in lines[head + 1:]:
        assert f"flashdmd {name}".strip() in example.replace("flashdmd.cli", "flashdmd"), example
    assert last.startswith(f"flashdmd {name}".strip()), last


@pytest.mark.parametrize("name,example", [(n, x) for n, xs in EXAMPLES.items() for x in xs])
def test_every_example_parses(name, example):
    words = shlex.split(example)
    words = words[words.index("flashdmd.cli") + 1:] if "flashdmd.cli" in words else words[1:]
    args = PARSER.parse_args(words)   # argparse exits on a command it does not accept
    assert isinstance(args, argparse.Namespace) and " ".join(words).startswith(name)


@pytest.mark.parametrize("name", ["distill", "sample", "make-reals", "eval", "eval-stats", "reward make-pairs",
                                  "reward train", "world pretrain"])
def test_long_commands_can_hide_their_progress_bars(name):
    parser = dict(COMMANDS)[name]
    assert any("--no-progress" in a.option_strings for a in parser._actions)

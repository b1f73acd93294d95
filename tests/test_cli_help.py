"""Every `flashdmd ... --help` ends with an example of that command, each example is a command the parser accepts,
and every long-running command has --no-progress."""
import argparse
import shlex

import pytest

from flashdmd import FlashDMDError
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


@pytest.mark.parametrize("argv", [["--help"], ["--threads", "1", "distill", "--help"], ["demo", "--help"],
                                  ["distill"]])
def test_help_and_argument_errors_come_before_torch_is_imported(argv):
    """`flashdmd --help`, a light command's --help and a missing argument are argparse's work alone: the parser adds
    only the named command's arguments and the world plug-in (torch, diffusers) is imported after parsing."""
    import subprocess
    import sys
    code = ("import sys\nfrom flashdmd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("no torch"), out.stdout[-300:] + out.stderr[-300:]


def test_a_command_parser_holds_only_that_commands_arguments_and_lists_every_command():
    from flashdmd.cli import COMMANDS, command_word
    assert command_word(["--threads", "2", "demo", "--seed", "1"]) == "demo"
    assert command_word(["--threads=2", "plan", "--config", "x"]) == "plan" and command_word(["--help"]) is None
    assert command_word(["--thr", "1", "distill"]) == "distill"   # argparse takes the abbreviation too
    assert build_parser(command_word(["--thr", "1", "demo", "--seed", "4"])).parse_args(
        ["--thr", "1", "demo", "--seed", "4"]).seed == 4
    one = build_parser("demo")
    sub = next(a for a in one._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    assert any("--seed" in a.option_strings for a in sub.choices["demo"]._actions)
    assert not any("--config" in a.option_strings for a in sub.choices["distill"]._actions)
    assert one.parse_args(["demo", "--seed", "3"]).seed == 3


def _imports_after(argv: list[str]) -> tuple[str, str]:
    """(what ``main(argv)`` printed to stderr, the heavy libraries it had imported: torch / diffusers / none)."""
    import subprocess
    import sys
    code = ("import sys\nfrom flashdmd.cli import main\nrc = main(sys.argv[1:])\n"
            "print('rc', rc, [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    return out.stderr, out.stdout.strip().splitlines()[-1]


def test_config_help_and_a_bad_config_come_before_diffusers_is_imported(tmp_path):
    """`config-help` needs no torch; a config error in `distill` is found before diffusers / transformers load (the
    config checks names against flashdmd.choices, the world plug-in imports its machinery when first used)."""
    err, last = _imports_after(["config-help"])
    assert last == "rc 0 []", last + err[-300:]
    for bad, said in [("bogus_key=1", "unknown key 'bogus_key'"), ("model_family=sdxx", "model_family must be one of")]:
        err, last = _imports_after(["distill", "--config", "configs/world_sdxl_demo.yaml", "--set", bad,
                                    "--out", str(tmp_path / "run")])
        assert last.startswith("rc 2 ") and "diffusers" not in last and "transformers" not in last, (bad, last)
        assert len(err.strip().splitlines()) == 1 and said in err, err
    assert not (tmp_path / "run").exists()


def test_the_light_names_are_the_ones_the_code_acts_on():
    from flashdmd import choices
    from flashdmd.families import FAMILIES, ZERO_T5_MODES
    from flashdmd.networks.quant import QUANTS
    assert tuple(FAMILIES) == choices.FAMILY_NAMES
    assert ZERO_T5_MODES == choices.ZERO_T5_MODES and QUANTS == choices.QUANTS
    from flashdmd.training.config import DistillConfig   # the config checks the light names
    for field, value, names in [("model_zero_t5", "zero", choices.ZERO_T5_MODES),
                                ("model_frozen_quant", "int4", choices.QUANTS)]:
        with pytest.raises(FlashDMDError, match=f"{field} must be one of {', '.join(names)}, got '{value}'"):
            DistillConfig(**{field: value})

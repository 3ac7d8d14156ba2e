"""Every code block of the README works: Python blocks run, and every `foldscale` and
launch/pretrain.py command line parses (with the flags it shows)."""
import re
import shlex
from pathlib import Path

import click
import pytest

from foldscale.cli import main
from tests.run_helpers import README_PYTHON

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON = README_PYTHON
COMMANDS = [line.split(" #")[0].strip() for line in re.findall(r"^    (.*)$", README, re.M)]


def test_python_blocks_run(capsys):
    assert PYTHON, "the README has no Python block"
    for block in PYTHON:
        if "model-hf" not in block:  # an HF export's blocks: tests/test_hf.py runs them beside one
            exec(compile(block, "README.md", "exec"), {})
    assert "new tokens" in capsys.readouterr().out


@pytest.mark.parametrize("line", [c for c in COMMANDS if c.startswith("foldscale ")])
def test_foldscale_command_lines_parse(line):
    args = shlex.split(line)[1:]
    command, ctx = main, None
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        command = command.get_command(ctx or click.Context(main), name)
        assert command is not None, f"{line}: no subcommand {name}"
    command.make_context(name, args)  # raises on an unknown option or a missing argument


@pytest.mark.parametrize("line", [c for c in COMMANDS if "launch/pretrain.py" in c and "..." not in c])
def test_pretrain_command_lines_parse(line):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    from pretrain import parse_args
    parse_args(shlex.split(line.split("launch/pretrain.py", 1)[1].rstrip("'")))

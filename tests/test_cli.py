"""The `mixer` entry point: every command's parser, and what listing commands costs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlpmixer.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_its_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mixer {command} ")


def test_the_full_parser_has_every_command() -> None:
    parser = build_parser()  # every command's module imported and registered
    assert parser.parse_args(["recipes"]).func is not None
    assert parser.parse_args(["info", "--json"]).json


def test_listing_and_help_do_not_import_torch() -> None:
    # torch takes seconds to import: `mixer --help`, `mixer train --help`, `recipes` and `info` (the
    # variants table) need none of it.
    code = (
        "import contextlib, io, sys\n"
        "from mlpmixer.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['recipes'], ['info'], ['info', '--json']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            assert main(argv) == 0\n"
        "        except SystemExit as stop:\n"
        "            assert stop.code == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

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


@pytest.mark.parametrize("command", list(COMMANDS))
def test_listing_and_help_do_not_import_torch(command: str) -> None:
    # torch takes seconds to import: `mixer --help`, every command's --help, `recipes` and `info` (the variants
    # table) need none of it.
    code = (
        "import contextlib, io, sys\n"
        "from mlpmixer.cli import main\n"
        f"for argv in (['--help'], [{command!r}, '--help'], ['recipes'], ['info'], ['info', '--json']):\n"
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


def test_convert_help_names_every_checkpoint_extension(capsys: pytest.CaptureFixture) -> None:
    """Its description names them without importing checkpoints.py (torch) for its EXTENSIONS."""
    import re

    from mlpmixer.checkpoints import EXTENSIONS

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    assert all(re.search(re.escape(ext) + r"\b", text) for ext in EXTENSIONS)


def test_the_docs_use_only_flags_the_commands_have(capsys: pytest.CaptureFixture) -> None:
    """Every `--flag` after `mixer COMMAND` on a line of the README or docs is in that command's --help."""
    import re

    helps = {}
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = capsys.readouterr().out
    mention = re.compile(r"mixer (" + "|".join(map(re.escape, COMMANDS)) + r")\b([^`\n|]*)")
    checked, unknown = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]:
        for found in mention.finditer(doc.read_text()):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", found.group(2)):
                checked += 1
                if flag not in helps[found.group(1)]:
                    unknown.append(f"{doc.name}: mixer {found.group(1)} {flag}")
    assert checked > 50 and not unknown


def test_our_warnings_are_one_line(tmp_path: Path, child_env: dict) -> None:
    """A skipped image is one "mixer: warning:" line, also from a DataLoader worker process."""
    from test_sources import make_folder

    from mlpmixer import create_model, save_checkpoint

    model = create_model("digits/4", img_size=8, patch_size=4, num_classes=2)
    model.class_names = ["a", "b"]
    save_checkpoint(model, tmp_path / "m.safetensors")
    make_folder(tmp_path / "data", {"a": 100, "b": 100}, bad=(7,))
    done = subprocess.run([sys.executable, "-m", "mlpmixer", "eval", str(tmp_path / "m.safetensors"), "--data",
                           str(tmp_path / "data"), "--workers", "1"], capture_output=True, text=True, timeout=120,
                          env=child_env)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "0007.png" in line]  # perhaps after the progress bar
    assert len(said) == 1 and f"mixer: warning: Skipping {tmp_path / 'data' / 'a' / '0007.png'}: " in said[0]
    assert "UserWarning" not in done.stderr
    assert "_load_counted" not in done.stderr  # no source line of the warnings.warn call


@pytest.mark.parametrize("entry", ["script", "module"])
def test_the_fast_paths_warning_is_said_as_mixers(tmp_path, entry) -> None:
    """It points at its caller's line, outside the package: the `mixer` script (or runpy's, for python -m), so
    mixer printed it in Python's raw format, with the file, the line and `sys.exit(main())`."""
    start = [str(Path(sys.executable).parent / "mixer")] if entry == "script" else [sys.executable, "-m", "mlpmixer"]
    done = subprocess.run([*start, "train", "--fast", "--drop-path", "0.1", "--steps", "1", "--batch-size", "16",
                           "--quiet", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("mixer: warning: The fast path does not fuse dropout or stochastic depth; training runs on the plain "
            "path.") in done.stderr
    assert "UserWarning" not in done.stderr and "sys.exit" not in done.stderr


def test_every_option_says_what_it_does() -> None:
    """`mixer COMMAND --help` explains every option, its default included where it has one."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    silent = [f"mixer {name} {action.option_strings[0]}" for name, sub in commands.items()
              for action in sub._actions if action.option_strings and not action.help]
    assert not silent


@pytest.mark.parametrize("value", ["1", "true", "Yes", "on"])
def test_mlpmixer_debug_takes_the_words_mlpmixer_offline_takes(value: str, tmp_path, monkeypatch) -> None:
    """MLPMIXER_DEBUG took only "1" where MLPMIXER_OFFLINE takes true, yes and on too: the traceback, not a sentence."""
    monkeypatch.setenv("MLPMIXER_DEBUG", value)
    with pytest.raises(ValueError, match="No checkpoint at"):  # raised as it is, for its traceback
        main(["info", str(tmp_path / "absent.safetensors")])
    monkeypatch.setenv("MLPMIXER_DEBUG", "0")
    assert main(["info", str(tmp_path / "absent.safetensors")]) == 2


def test_debug_after_the_command_help_and_a_commands_own_usage(tmp_path, capsys) -> None:
    """`mixer eval X --debug` was an unknown argument; `mixer train --bogus` showed mixer's usage, not train's; and
    `mixer help` was an invalid command."""
    with pytest.raises(ValueError, match="No checkpoint at"):  # the traceback, as with `mixer --debug eval X`
        main(["eval", str(tmp_path / "absent.safetensors"), "--debug"])
    with pytest.raises(SystemExit) as usage:
        main(["train", "--bogus"])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and err.startswith("usage: mixer train ") and \
        err.endswith("mixer train: error: unrecognized arguments: --bogus\n")
    for argv, first in ((["help"], "usage: mixer [-h]"), (["help", "eval"], "usage: mixer eval ")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0 and capsys.readouterr().out.startswith(first)

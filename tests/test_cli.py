"""The one command line: `minigpt2 COMMAND` = `python -m minigpt2 COMMAND`, help for each
command, and imports that point one way (cli -> library)."""

import ast
import importlib
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest
from conftest import ROOT

from minigpt2.cli import COMMANDS, main

PACKAGE = ROOT / "src" / "minigpt2"


def test_python_m_and_console_script_list_the_same_commands():
    by_module = subprocess.run(
        [sys.executable, "-m", "minigpt2", "--help"], capture_output=True, text=True, timeout=60
    )
    assert by_module.returncode == 0, by_module.stderr
    for name in COMMANDS:
        assert f"  {name} " in by_module.stdout
    script = shutil.which("minigpt2")
    if script is None:
        pytest.skip("the minigpt2 console script is not on PATH (package not installed)")
    by_script = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert by_script.returncode == 0 and by_script.stdout == by_module.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "lm-eval"])
def test_each_command_help_lists_its_options_with_defaults(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as e:  # argparse's help exits 0
        code = e.code
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"usage: minigpt2 {command}")
    if command == "train":  # every TrainConfig key with its default, as TOML
        from minigpt2.config import TrainConfig

        for field in fields(TrainConfig):
            assert f"\n{field.name} = " in out
        return
    module = importlib.import_module(f"minigpt2.cli.{COMMANDS[command][0]}")
    for action in module.parser()._actions:
        if action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help line"
            if action.option_strings:  # ArgumentDefaultsHelpFormatter then shows the default
                assert action.option_strings[-1] in out


def test_unknown_command_is_one_line(capsys):
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'pretrain'" in err[0] and "train" in err[0]


def test_library_never_imports_the_command_line():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts[:1] or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [a.name for a in node.names]
                if (
                    module in ("cli", "minigpt2.cli")
                    or module.startswith(("cli.", "minigpt2.cli."))
                    or (module in ("", "minigpt2") and "cli" in names)
                ):
                    offenders.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import):
                if any(a.name.startswith("minigpt2.cli") for a in node.names):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_old_module_entry_points_are_gone():
    for module in ("data", "pretrained"):
        assert "__main__" not in (PACKAGE / f"{module}.py").read_text()

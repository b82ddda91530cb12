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
        from minigpt2.train.config import TrainConfig

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


# The rooms of the package, top to bottom: a module imports only from rooms below its own (or
# from its own room). decode and formats share a layer, as do data and model: neither of a pair
# imports the other.
LAYERS = {
    "cli": 6,
    "train": 5,
    "serve": 5,
    "evaluate": 4,
    "decode": 3,
    "formats": 3,
    "data": 2,
    "model": 2,
    "device": 1,
    "errors": 0,
}


def imported_modules(path) -> list[tuple[int, str]]:
    """(line, absolute minigpt2 module) of every import in a file, function-level included."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]  # of a package's __init__.py, the package itself
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [] if node.module else [a.name for a in node.names]
            found += [(node.lineno, f"{module}.{n}") for n in names] or [(node.lineno, module)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minigpt2"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("minigpt2")]
    return found


def room(module: str) -> str | None:
    """The room (subpackage or top module) a dotted minigpt2 module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_point_down_the_layers():
    """Every import, function-level ones too, goes to a lower room or stays in its own; the
    package's top (which gathers the public names) is imported by nobody inside it."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own in ("__init__", "__main__"):
            continue
        assert own in LAYERS, f"{path}: a room the layering does not know; add it to LAYERS"
        for line, module in imported_modules(path):
            target = room(module)
            where = f"{path.relative_to(PACKAGE)}:{line} imports {module}"
            if target is None:
                offenders.append(f"{where} (the package's top)")
            elif target != own and LAYERS[target] >= LAYERS[own]:
                offenders.append(where)
    assert offenders == []


def test_the_layering_test_sees_a_violation(tmp_path):
    """The walker resolves relative imports, function-level ones included."""
    path = PACKAGE / "model" / "probe_for_layering_test.py"
    path.write_text("def f():\n    from ..train.trainer import Trainer\n")
    try:
        assert (2, "minigpt2.train.trainer") in imported_modules(path)
    finally:
        path.unlink()


def test_old_module_entry_points_are_gone():
    for module in ("data/corpus", "formats/released"):
        assert "__main__" not in (PACKAGE / f"{module}.py").read_text()

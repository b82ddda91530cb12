"""`minigpt2 <command>`, also `python -m minigpt2 <command>`: the project's one command line.

Each command lives in its own module with its own parser; the library never imports this package.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import run_cli

# command -> (module under minigpt2.cli, its entry function, one line for the command list)
COMMANDS = {
    "prepare": ("prepare", "prepare_main", "tokenise a corpus into cached token shards"),
    "train": ("train", "train_main", "pretrain or fine-tune from a TOML config and --key=value"),
    "sample": ("sample", "sample_main", "generate text from a checkpoint or released model"),
    "serve": ("serve", "serve_main", "serve a model over OpenAI's HTTP API, with a chat page"),
    "chat": ("chat", "chat_main", "a conversation with a model in the terminal"),
    "classify": ("classify", "classify_main", "label texts with a model trained to classify"),
    "export": ("export", "export_main", "write the released layout (+ tokenizer) or a GGUF file"),
    "eval": ("eval", "eval_main", "perplexity of a text, HellaSwag, or a classifier's accuracy"),
    "lm-eval": ("eval", "lm_eval_main", "EleutherAI's lm-evaluation-harness on a model"),
}


def usage() -> str:
    """The top-level help: every command with its line."""
    lines = [f"  {name:<9} {text}" for name, (_, _, text) in COMMANDS.items()]
    return (
        "usage: minigpt2 COMMAND [options]   (or: python -m minigpt2 COMMAND ...)\n\n"
        "commands:\n" + "\n".join(lines) + "\n\nminigpt2 COMMAND --help lists a command's options."
    )


def main(argv: list[str] | None = None, **defaults) -> int:
    """Run `minigpt2 COMMAND ...`; defaults go to the command (train.py's default config)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    module, function, _ = COMMANDS[argv[0]]
    entry = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    return run_cli(lambda args: entry(args, **defaults), argv[1:])


def run() -> None:
    """The `minigpt2` console script."""
    sys.exit(main())

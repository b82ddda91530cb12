"""`python -m minigpt2 <command>`: eval (perplexity, HellaSwag) and lm-eval (the harness)."""

import sys

from .cli_eval import eval_main, lm_eval_main
from .errors import run_cli

COMMANDS = {"eval": eval_main, "lm-eval": lm_eval_main}


def main(argv: list[str]) -> int:
    """Dispatch to a command's own parser."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
            return 2
        print(f"usage: python -m minigpt2 COMMAND [options]\ncommands: {known}")
        return 0
    return run_cli(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

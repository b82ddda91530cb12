"""The one error type the project raises for bad input; scripts print it as one line."""

import os
import sys


class MiniGPT2Error(Exception):
    """A problem with the user's input, configuration or files, with a message saying the fix."""


def run_cli(main, argv=None) -> int:
    """Run a command-line entry point; the project's errors become one line and exit code 2,
    Ctrl-C one line and 130 (128 + SIGINT, as a shell reports it). Commands write files to a
    temporary name and rename them when whole, so an interrupted one leaves nothing half done."""
    try:
        return main(argv) or 0
    except MiniGPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # 128 + SIGPIPE, as a shell reports it
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted (Ctrl-C); nothing was left half written", file=sys.stderr)
        return 130

"""The one error type the project raises for bad input; scripts print it as one line."""


class MiniGPT2Error(Exception):
    """A problem with the user's input, configuration or files, with a message saying the fix."""


def run_cli(main, argv=None) -> int:
    """Run a command-line entry point; the project's errors become one line and exit code 2."""
    import sys

    try:
        return main(argv) or 0
    except MiniGPT2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

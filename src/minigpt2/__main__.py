"""`python -m minigpt2 <command>`: the same command line as the `minigpt2` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Sample from a checkpoint: `python sample.py --model out/quickstart --prompt "def "`.

The same as `minigpt2 sample`; --model also takes a released-layout directory, nanoGPT's ckpt.pt
or gpt2 / gpt2-medium / ...; see --help.
"""

import sys

from minigpt2.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))

"""Train or fine-tune a GPT-2: `python train.py [configs/X.toml] [--key=value ...]`.

The same as `minigpt2 train`, except that with no config file it runs the quickstart
(configs/quickstart.toml). See README.md.
"""

import sys
from pathlib import Path

from minigpt2.cli import main

if __name__ == "__main__":
    quickstart = Path(__file__).resolve().parent / "configs" / "quickstart.toml"
    sys.exit(main(["train", *sys.argv[1:]], default_config=str(quickstart)))

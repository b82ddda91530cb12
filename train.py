"""Train or fine-tune a GPT-2: `python train.py [configs/X.toml] [--key=value ...]`.

With no arguments it runs the quickstart (configs/quickstart.toml). See README.md.
"""

from pathlib import Path

from minigpt2.cli import main_train

if __name__ == "__main__":
    main_train(str(Path(__file__).resolve().parent / "configs" / "quickstart.toml"))

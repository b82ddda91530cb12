"""Sample from a checkpoint: `python sample.py --model out/quickstart --prompt "def "`.

--model also takes a released-layout directory or gpt2 / gpt2-medium / ...; see --help.
"""

from minigpt2.cli import main_sample

if __name__ == "__main__":
    main_sample()

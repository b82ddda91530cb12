"""`minigpt2 train [CONFIG.toml] [--key=value ...]`: pretrain or fine-tune."""

from __future__ import annotations

from pathlib import Path

from ..errors import MiniGPT2Error
from ..formats.checkpoint import LATEST, read_header
from ..train.config import TrainConfig, from_settings, read_settings, resume_config
from ..train.trainer import Trainer, print_summary


def train_main(argv: list[str], default_config: str | None = None) -> int:
    """Train from a config file and overrides; without a file, default_config (or the defaults)."""

    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: minigpt2 train [CONFIG.toml] [--key=value ...]\n"
            "Keys come from the config file, then from --key=value; every key and its default:\n"
            + TrainConfig().to_toml(comments=True)
        )
        return 0
    defaults, settings = read_settings(argv, default_config)
    cfg = from_settings({}, {**defaults, **settings})
    if cfg.init_from == "resume":
        header = read_header(Path(cfg.out_dir) / LATEST)
        cfg = resume_config(header["train_config"], settings, cfg.out_dir)
        if header["iter"] >= cfg.max_iters and not cfg.eval_only:
            raise MiniGPT2Error(
                f"the run in {cfg.out_dir} already reached step {header['iter']}"
                f"; raise max_iters to train further"
            )
    summary = Trainer(cfg).run()
    print_summary(summary)
    if "interrupted" in summary:
        return 130 if summary["interrupted"] == "SIGINT" else 143
    return 0

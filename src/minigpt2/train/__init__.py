"""Training: the config, what a run starts from, the optimizer and schedule, the loop, its reports,
its out_dir, and torchrun (DDP, FSDP)."""

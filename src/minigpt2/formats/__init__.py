"""Files in and out: training checkpoints, the released GPT-2 layout, nanoGPT's ckpt.pt, GGUF,
transformers' tokenizer files, PEFT adapters, and what --model names."""

"""The model: GPT-2's configuration and presets, attention with its KV cache, the blocks and the
language model, and low-rank adapters. It knows no file format."""

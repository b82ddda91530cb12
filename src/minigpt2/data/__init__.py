"""Text into tokens: the tokenizers, corpus preparation into cached shards, batches drawn from
them, and record files (instruction, prompt/completion, chat)."""

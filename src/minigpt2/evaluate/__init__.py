"""Measuring a model: scoring continuations, sliding-window perplexity, HellaSwag, and the model
for lm-evaluation-harness."""

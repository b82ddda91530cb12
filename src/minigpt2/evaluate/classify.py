"""A sequence classifier at work: class probabilities of texts, and accuracy and loss over
labelled records (minigpt2 classify, minigpt2 eval --task classification)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MiniGPT2Error


def check_classifier(model, source: str) -> tuple[str, ...]:
    """The model's class names; a language model without a score head is refused."""
    labels = model.config.labels
    if not labels:
        raise MiniGPT2Error(
            f"{source} is a language model, not a classifier; train one with "
            "--task=classification (or start from a GPT2ForSequenceClassification directory)"
        )
    return labels


@torch.no_grad()
def class_logits(model, texts: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """(N, classes) float32 logits of token-id texts, each cut to the model's context and read
    at its last token; batches of similar lengths, padded on the right."""
    limit = model.config.block_size
    rows = [t[:limit] for t in texts]
    order = np.argsort([-len(t) for t in rows], kind="stable")
    device = next(model.parameters()).device
    out = torch.empty(len(rows), len(model.config.labels))
    for start in range(0, len(rows), batch_size):
        pick = order[start : start + batch_size]
        width = max(len(rows[i]) for i in pick)
        x = torch.zeros(len(pick), width, dtype=torch.long)
        mask = torch.zeros(len(pick), width, dtype=torch.long)
        for r, i in enumerate(pick):
            x[r, : len(rows[i])], mask[r, : len(rows[i])] = torch.tensor(rows[i]), 1
        logits = model(x.to(device), attention_mask=mask.to(device), head="score")
        out[torch.as_tensor(pick)] = logits.float().cpu()
    return out


def classification_scores(
    model, texts: list[list[int]], labels: np.ndarray, batch_size: int = 16
) -> dict:
    """Examples, accuracy (a fraction) and mean cross-entropy of labelled texts."""
    logits = class_logits(model, texts, batch_size)
    target = torch.as_tensor(labels, dtype=torch.long)
    return {
        "examples": len(texts),
        "accuracy": (logits.argmax(-1) == target).float().mean().item(),
        "loss": F.cross_entropy(logits, target).item(),
    }

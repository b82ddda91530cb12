"""What a run minimises, batch by batch: next-token loss (lm), DPO's preference loss (dpo) or a
classifier's cross-entropy (classification). Each objective makes the run's samplers, the loss
of a micro-batch with the statistics it logs, and the sums an evaluation adds up; the loop in
trainer.py is the same for all three.

DPO (Rafailov et al. 2023, eq. 7): with pi the policy and ref the reference, the log-probability
of a response summed over its tokens given the prompt, and h = (log pi(c) - log ref(c)) -
(log pi(r) - log ref(r)), the sigmoid loss is -log sigmoid(beta h). IPO (Azar et al. 2023,
eq. 17) is (h - 1/(2 beta))^2 on log-probabilities averaged over the response's tokens, as TRL
computes it. Rewards and their names are TRL's: rewards/chosen = beta (log pi(c) - log ref(c)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batches import Batch, Batches, RecordBatches
from ..data.labels import LabelBatches
from ..data.preference import PairBatches
from ..errors import MiniGPT2Error

EVAL_STREAMS = {"train": 1, "val": 2}  # sampler streams: evaluation never reuses training draws
DPO_STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def response_logps(net, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, scored tokens) of each of a packed pair batch's 2B responses,
    chosen ones first: logits only where a response token is predicted."""
    logits = net(b.x, attention_mask=b.attention_mask, positions=b.positions, at=b.at)
    logp = -F.cross_entropy(logits.float(), b.y, reduction="none")
    rows = 2 * b.x.shape[0]
    summed = torch.zeros(rows, device=logp.device, dtype=logp.dtype).index_add(0, b.owner, logp)
    return summed, torch.bincount(b.owner, minlength=rows)


def dpo_terms(
    policy: torch.Tensor,
    reference: torch.Tensor,
    tokens: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> dict[str, torch.Tensor]:
    """Per pair: the loss, the rewards and the policy's log-probabilities, for rows laid out
    as a pair batch lays them out (B chosen, then B rejected)."""
    if kind == "ipo":  # IPO compares mean per-token log-probabilities
        policy, reference = policy / tokens, reference / tokens
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    h = (pc - rc) - (pr - rr)
    loss = (h - 1 / (2 * beta)) ** 2 if kind == "ipo" else -F.logsigmoid(beta * h)
    chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    return {"loss": loss, "chosen": chosen, "rejected": rejected, "pc": pc, "pr": pr}


class NextToken:
    """Next-token cross-entropy over a text corpus or records (mean over counted targets)."""

    name = "lm"
    stats: tuple[str, ...] = ()  # what a training step reports beside its loss
    eval_stats: tuple[str, ...] = ()  # what an evaluation reports beside its loss
    perplexity = True

    def samplers(self, data, fmt: str, block_size: int, seed: int, source: str):
        """(training sampler, evaluation samplers by split, a note on the data or None)."""
        if fmt == "text":
            train = Batches(data.train, block_size, seed, 0, "train")
            evals = {
                s: Batches(getattr(data, s), block_size, seed, n, s)
                for s, n in EVAL_STREAMS.items()
            }
            return train, evals, None
        train, evals = whole_items(RecordBatches, data, block_size, seed)
        limit = f"block_size+1 = {block_size + 1}"
        return train, evals, _note(fmt, source, train, evals, "records", limit)

    def loss(self, net, b: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's mean loss, and the sums of the step's statistics (None: none)."""
        return net(b.x, b.y, b.attention_mask)[1], None

    def eval_sums(self, net, b: Batch) -> torch.Tensor:
        """(summed loss, counted units, summed eval_stats) of an evaluation batch."""
        loss = net(b.x, b.y, b.attention_mask)[1].float()
        return torch.stack([loss * b.counted, torch.ones_like(loss) * b.counted])


class Preference(NextToken):
    """DPO on pairs, against reference log-probabilities computed once before training."""

    name = "dpo"
    stats = DPO_STATS
    eval_stats = ("reward_accuracy", "reward_margin")
    perplexity = False

    def __init__(self, beta: float, kind: str) -> None:
        self.beta, self.kind = beta, kind

    def samplers(self, data, fmt: str, block_size: int, seed: int, source: str):
        train, evals = whole_items(PairBatches, data, block_size, seed)
        limit = f"block_size+1 = {block_size + 1}"
        return train, evals, _note("preference", source, train, evals, "pairs", limit)

    def _terms(self, net, b: Batch) -> dict[str, torch.Tensor]:
        logps, tokens = response_logps(net, b)
        return dpo_terms(logps, b.reference, tokens, self.beta, self.kind)

    def loss(self, net, b: Batch):
        t = self._terms(net, b)
        margin = t["chosen"] - t["rejected"]
        stats = [t["chosen"], t["rejected"], (margin > 0).float(), margin, t["pc"], t["pr"]]
        return t["loss"].mean(), torch.stack([s.detach().sum() for s in stats])

    def eval_sums(self, net, b: Batch) -> torch.Tensor:
        t = self._terms(net, b)
        margin = t["chosen"] - t["rejected"]
        n = torch.ones((), device=margin.device) * b.counted
        return torch.stack([t["loss"].sum(), n, (margin > 0).float().sum(), margin.sum()])


class Classification(NextToken):
    """Cross-entropy of a score head on each text's last real token."""

    name = "classification"
    stats = ("accuracy",)
    eval_stats = ("accuracy",)
    perplexity = False

    def samplers(self, data, fmt: str, block_size: int, seed: int, source: str):
        train, evals = whole_items(LabelBatches, data, block_size, seed)
        limit = f"block_size = {block_size}"
        return train, evals, _note("classification", source, train, evals, "records", limit)

    def loss(self, net, b: Batch):
        logits, loss = net(b.x, b.y, b.attention_mask, head="score")
        return loss, (logits.argmax(-1) == b.y).float().sum().detach()[None]

    def eval_sums(self, net, b: Batch) -> torch.Tensor:
        logits, loss = net(b.x, b.y, b.attention_mask, head="score")
        right = (logits.argmax(-1) == b.y).float().sum()
        return torch.stack([loss.float() * b.counted, torch.ones_like(right) * b.counted, right])


def whole_items(kind, data, block_size: int, seed: int):
    """(training sampler, evaluation samplers) of records, pairs or labelled texts: every
    validation item is scored at every evaluation, the training split's fixed sample."""
    train = kind(data.train, block_size, seed, 0)
    evals = {
        s: kind(getattr(data, s), block_size, seed, n, s == "val") for s, n in EVAL_STREAMS.items()
    }
    return train, evals


def _note(fmt: str, source: str, train, evals, unit: str, limit: str) -> str:
    """The line a run prints about its data."""
    return (
        f"{len(train):,} training and {len(evals['val']):,} validation {unit} ({fmt}) from "
        f"{source}; {train.cut + evals['val'].cut} longer than {limit} tokens were cut at "
        "the end"
    )


def objective_for(cfg) -> NextToken:
    """The run's objective, from its objective and task keys."""
    if cfg.objective == "dpo":
        return Preference(cfg.dpo_beta, cfg.dpo_loss)
    if cfg.task == "classification":
        return Classification()
    return NextToken()


@torch.no_grad()
def reference_logps(model, sampler: PairBatches, batch_size: int, rank: int, world: int, run):
    """Fill sampler.reference with model's summed log-probabilities of every pair's two
    responses. Rank r scores batches r, r + world, ...; run(fn) runs fn under the run's
    autocast and returns a tensor summed over the ranks."""
    n = len(sampler)
    device = next(model.parameters()).device
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    order = np.argsort(-sampler.widths, kind="stable")  # longest first: batches pad little

    def score() -> torch.Tensor:
        for k in range(rank, -(-n // batch_size), world):
            pick = order[k * batch_size : (k + 1) * batch_size].tolist()
            b = sampler.batch(pick, device)
            logps, _ = response_logps(model, b)
            out[pick] = torch.stack(logps.double().chunk(2), 1)
        return out

    sampler.reference = run(score).cpu().numpy().astype(np.float64)
    if not np.isfinite(sampler.reference).all():
        raise MiniGPT2Error("the reference model gives a non-finite log-probability; check it")

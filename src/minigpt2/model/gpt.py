"""GPT-2's language model: positions, MLP, blocks and the model (config in config.py).

Parameter names follow GPT-2's (transformer.wte, h.N.attn.c_attn, ...). Linear weights are
stored as torch's nn.Linear does, (out_features, in_features); released checkpoints store them
the other way round and formats/released.py transposes on the way in and out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import MiniGPT2Error
from .attention import CausalSelfAttention, KVCache, padding_mask
from .config import GPTConfig

# The released layout's reader and writer, behind GPT.from_pretrained and save_pretrained: the
# model knows no file format, formats/released.py registers them (minigpt2's package imports it).
RELEASED_LAYOUT: dict[str, Callable] = {}
IGNORE_INDEX = -1  # targets never scored: nanoGPT's -1; transformers' -100 is mapped to it


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos position table of Vaswani et al. 2017 (section 3.5): computed, not
    trained, not saved. PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same)."""

    def __init__(self, block_size: int, n_embd: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoid_table(block_size, n_embd), persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]

    def reset_table(self) -> None:
        """Recompute the table in place (after the module was built on the meta device)."""
        self.table = sinusoid_table(*self.table.shape).to(self.table.device)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) float32 table of SinusoidalPositions, computed in float64."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim/2),)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


def _table(rows: int, width: int) -> nn.Embedding:
    """An embedding table on the meta device, left undrawn: nn.Embedding's own init would call
    normal_ on a meta tensor, whose first use imports torch._dynamo (about 1 s per process)."""
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width, device="meta"))


def init_tensor(t: torch.Tensor, kind: str, std: float) -> None:
    """Fill t in place as one step of GPT.init_plan says."""
    if kind == "normal":
        nn.init.normal_(t, mean=0.0, std=std)
    else:
        nn.init.ones_(t) if kind == "ones" else nn.init.zeros_(t)


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (GPT-2's tanh approximation), project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT-2 language model: embeddings, blocks, final LayerNorm, head tied to wte."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        device = torch.empty(0).device  # where the caller builds (cpu, or a torch.device context)
        with torch.device("meta"):  # no memory and no draws yet: reset_parameters draws once
            self.transformer = nn.ModuleDict(
                dict(
                    wte=_table(config.vocab_size, config.n_embd),
                    wpe=_table(config.block_size, config.n_embd)
                    if config.pos_embedding == "learned"
                    else SinusoidalPositions(config.block_size, config.n_embd),
                    drop=nn.Dropout(config.dropout),
                    h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                    ln_f=nn.LayerNorm(
                        config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias
                    ),
                )
            )
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
            if config.labels:  # a sequence classifier's head (transformers' name for it)
                self.score = nn.Linear(config.n_embd, len(config.labels), bias=False)
        self.activation_checkpointing = False  # a training choice; set by the trainer
        if device.type != "meta":  # meta: weights about to be loaded or sharded (FSDP)
            self._allocate(device)
            self.reset_parameters()

    def _allocate(self, device: torch.device) -> None:
        """Give every meta parameter and buffer memory on device, the head tied again. Not
        Module.to_empty: its empty_like on meta tensors imports torch's symbolic shapes
        machinery, about 0.5 s per process."""
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                empty = torch.empty(p.shape, dtype=p.dtype, device=device)
                setattr(module, name, nn.Parameter(empty, requires_grad=p.requires_grad))
            for name, b in module.named_buffers(recurse=False):
                setattr(module, name, torch.empty(b.shape, dtype=b.dtype, device=device))
        self.lm_head.weight = self.transformer.wte.weight

    def init_plan(self) -> list[tuple[str, str, float]]:
        """GPT-2's initialisation, parameter by parameter in drawing order: (name, "normal",
        std), (name, "zeros", 0) or (name, "ones", 0). The tied head is wte, listed once."""
        plan = []
        # GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(N),
        # N = 2 * n_layer residual additions (Radford et al. 2019, section 2.3).
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                plan.append((name, "normal", residual_std))
            elif p.ndim == 2:  # linear weights and embedding tables
                plan.append((name, "normal", 0.02))
            elif name.endswith("weight"):  # LayerNorm gains start at one
                plan.append((name, "ones", 0.0))
            else:  # every bias at zero
                plan.append((name, "zeros", 0.0))
        return plan

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw fresh weights as GPT-2 does (init_plan), and recompute the fixed buffers."""
        for name, kind, std in self.init_plan():
            init_tensor(self.get_parameter(name), kind, std)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the buffers that are not saved (after memory was given to a meta model)."""
        if isinstance(self.transformer.wpe, SinusoidalPositions):
            self.transformer.wpe.reset_table()

    @torch.no_grad()
    def set_labels(self, labels: tuple[str, ...]) -> None:
        """Give the model a fresh `score` head for these classes, drawn as transformers draws
        GPT2ForSequenceClassification's (normal, std initializer_range = 0.02)."""
        self.config.labels = tuple(labels)
        weight = self.transformer.wte.weight
        self.score = nn.Linear(self.config.n_embd, len(labels), bias=False, device=weight.device)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)

    def set_attn_impl(self, impl: str) -> None:
        """Switch every block's attention to "sdpa" or "math" (the weights do not change)."""
        self.config.attn_impl = impl
        for block in self.transformer.h:
            block.attn.attn_impl = impl

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied embedding counted once; optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - sum(p.numel() for p in self.transformer.wpe.parameters()) * non_embedding

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N + 12*L*C*T (PaLM paper, app. B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def hidden_states(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd) for token ids idx (B, T).

        attention_mask (B, T): 1 for real tokens, 0 for padding (of idx only; a cache keeps
        the earlier ones). Padded keys are never attended and positions count real tokens
        only (cumsum - 1, as transformers' generate), so left padding shifts nothing.
        Packed rows, several sequences sharing a prefix, give instead the keys each query
        sees, attention_mask (B, T, T) boolean, and every token's position (B, T).
        """
        if attention_mask is not None and attention_mask.dim() == 3:
            if positions is None or cache is not None:
                raise MiniGPT2Error("a (B, T, T) attention mask needs positions and no cache")
            pos, mask = positions, attention_mask[:, None].bool()
        else:
            pos, mask = self._positions_and_mask(idx, cache, attention_mask)
        # With padding, rows hold fewer real tokens than there are columns: positions decide.
        length = (cache.pos if cache is not None else 0) + idx.shape[1]
        if mask is not None:
            length = int(pos.max()) + 1
        if length > self.config.block_size:
            raise MiniGPT2Error(
                f"sequence of {length} tokens is longer than the model's context "
                f"(block_size={self.config.block_size})"
            )
        tok = self.transformer.wte(idx)
        if self.config.pos_embedding == "sinusoidal":
            # Vaswani et al. scale token embeddings by sqrt(d_model) (section 3.4) to stand up to
            # the table's +-1 entries; unscaled, GPT-2's 0.02-std embeddings drown in it
            # (shakespeare_char: validation 2.44 unscaled, 1.84 scaled; BENCHMARKS.md).
            tok = tok * math.sqrt(self.config.n_embd)
        x = self.transformer.drop(tok + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and cache is None:
                # keep only each block's input; recompute its insides in the backward pass
                x = checkpoint(block, x, None, i, mask, use_reentrant=False)
            else:
                x = block(x, cache, i, mask)
        if cache is not None and cache.lengths is not None:
            cache.lengths[: idx.shape[0]] += cache.live[: idx.shape[0]]
        elif cache is not None:
            cache.pos += idx.shape[1]
        return self.transformer.ln_f(x)

    def _positions_and_mask(self, idx, cache: KVCache | None, attention_mask):
        """Position ids, (T,) or (B, T), and the attention mask for the blocks (None: causal)."""
        B, T = idx.shape
        if cache is not None and cache.lengths is not None:  # slots: one token a row
            if T != 1:
                raise MiniGPT2Error("a slot cache takes one token a row; prompts go in row(i)")
            at = cache.lengths[:B]
            keys = torch.arange(int(at.max()) + 1, device=idx.device)[None, :] <= at[:, None]
            return at[:, None], keys[:, None, None, :]
        past = cache.pos if cache is not None else 0
        padded = cache is not None and cache.mask is not None
        if attention_mask is not None and not padded:
            padded = not bool(attention_mask.bool().all())  # all real: keep the fused causal path
        if not padded:
            return torch.arange(past, past + T, dtype=torch.long, device=idx.device), None
        real = torch.ones_like(idx, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask.to(device=idx.device, dtype=torch.bool)
        seen = torch.full((B,), past, dtype=torch.long, device=idx.device)
        keys = real
        if cache is not None:
            if cache.mask is None:  # the first padding this cache sees: all earlier are real
                shape = (cache.kv.shape[2], cache.kv.shape[4])
                cache.mask = torch.ones(shape, dtype=torch.bool, device=idx.device)
                cache.seen = seen
            seen = cache.seen.clone()
            cache.mask[:, past : past + T] = real
            cache.seen += real.sum(1)
            keys = cache.mask[:, : past + T]
        pos = (seen[:, None] + real.long().cumsum(1) - 1).masked_fill(~real, 0)
        return pos, padding_mask(keys, T)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        head: str = "lm",
        positions: torch.Tensor | None = None,
        at: torch.Tensor | None = None,
    ):
        """Logits (B, T, vocab) for idx (B, T); with targets (B, T), also the mean cross-entropy
        over the targets that count: -1 (nanoGPT) and -100 (transformers) are ignored.
        attention_mask (B, T) marks real tokens with 1 and padding with 0 (or is a packed
        batch's (B, T, T) mask, with positions: see hidden_states). at (N,): logits only at
        these flat positions (row * T + column), (N, vocab), targets then (N,): the head is
        a third of gpt2's forward FLOPs, wasted on tokens nobody scores. head="score": class
        logits instead (a classifier's; targets are then labels, (B,))."""
        hidden = self.hidden_states(idx, attention_mask=attention_mask, positions=positions)
        if head == "score":
            return self._classify(hidden, targets, attention_mask)
        if at is not None:
            hidden = hidden.flatten(0, 1)[at]
        logits = self.lm_head(hidden)
        if targets is None:
            return logits
        targets = targets.masked_fill(targets == -100, IGNORE_INDEX)
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return logits, loss

    def _classify(self, hidden, labels, attention_mask):
        """Class logits (B, labels) read at each row's last real token, as transformers'
        GPT2ForSequenceClassification reads them; with labels (B,), also their mean
        cross-entropy."""
        B, T, _ = hidden.shape
        last = torch.full((B,), T - 1, device=hidden.device)
        if attention_mask is not None:  # the highest position holding a real token
            at = torch.arange(T, device=hidden.device)
            last = (at * attention_mask.to(hidden.device).long()).argmax(-1)
        logits = self.score(hidden[torch.arange(B, device=hidden.device), last])
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (and the position table) to block_size, e.g. to fine-tune cheaper."""
        if not 1 <= block_size <= self.config.block_size:
            raise MiniGPT2Error(
                f"block_size={block_size} must be between 1 and the model's "
                f"{self.config.block_size}"
            )
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        if isinstance(wpe, SinusoidalPositions):
            wpe.table = wpe.table[:block_size].clone()
            return
        wpe.weight = nn.Parameter(wpe.weight.detach()[:block_size].clone())
        wpe.num_embeddings = block_size

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **kwargs) -> GPT:
        """Load released GPT-2 weights from a directory or a Hub preset name (gpt2, ...)."""
        return RELEASED_LAYOUT["load"](name_or_dir, **kwargs)

    def save_pretrained(self, out_dir: str, tokenizer=None) -> list[str]:
        """Write the released GPT-2 layout (config.json + model.safetensors, and the tokenizer's
        files when given one); returns the names written."""
        return RELEASED_LAYOUT["save"](self, out_dir, tokenizer)

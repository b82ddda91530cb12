"""GPT-2 in one module: config, presets, attention, MLP, blocks and the language model.

Parameter names follow GPT-2's (transformer.wte, h.N.attn.c_attn, ...). Linear weights are
stored as torch's nn.Linear does, (out_features, in_features); released checkpoints store them
the other way round and pretrained.py transposes on the way in and out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MiniGPT2Error


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 model."""

    block_size: int = 1024  # longest sequence: the size of the learned position table
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide evenly
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on attention weights, residual branches and embeddings
    bias: bool = True  # biases in linear layers and LayerNorms, as in GPT-2
    layer_norm_epsilon: float = 1e-5  # GPT-2's value
    attn_impl: str = "sdpa"  # "sdpa" (fused kernels) or "math" (explicit masked softmax)

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise MiniGPT2Error(f"model config: {name} must be at least 1")
        if self.n_embd % self.n_head:
            raise MiniGPT2Error(
                f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise MiniGPT2Error(f"model config: dropout={self.dropout} must be in [0, 1)")
        if self.attn_impl not in ("sdpa", "math"):
            raise MiniGPT2Error(f"model config: attn_impl={self.attn_impl!r}; use sdpa or math")

    def to_dict(self) -> dict:
        """Plain dict of the fields, for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict, refusing keys that are not fields."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise MiniGPT2Error(
                f"model config: unknown key(s) {unknown}; valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named preset (see PRESETS), with fields overridden."""
        if name not in PRESETS:
            raise MiniGPT2Error(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Sizes of the four released GPT-2 models (Radford et al. 2019, table 2, with the published
# configs), plus small shapes for tests and CPU runs.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


class KVCache:
    """Preallocated keys and values of every layer, filled as tokens are generated."""

    def __init__(self, config: GPTConfig, batch: int, length: int, device, dtype) -> None:
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, 2, batch, config.n_head, length, hd)
        self.kv = torch.empty(shape, device=device, dtype=dtype)  # only [:pos] is ever read
        self.pos = 0  # tokens already stored


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:  # append this step's keys and values, attend over all so far
            past = cache.pos
            cache.kv[layer, 0, :, :, past : past + T] = k
            cache.kv[layer, 1, :, :, past : past + T] = v
            k = cache.kv[layer, 0, :, :, : past + T]  # (B, nh, past+T, hs)
            v = cache.kv[layer, 1, :, :, : past + T]
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype is torch.bfloat16 and torch.is_grad_enabled():
            # torch's CPU flash-attention backward is ~8x slower in bfloat16 than in float32
            # (measured: 4.6 ms vs 0.54 ms per call at B=12, T=64, C=128); attention is a
            # small share of the FLOPs, so it runs in float32 and the matmuls stay bfloat16.
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), past, dropout).to(q.dtype)
        else:
            y = self._attend(q, k, v, past, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-join heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q, k, v, past: int, dropout: float) -> torch.Tensor:
        """(B, nh, T, hs) outputs of q attending over k, v with the causal mask."""
        T = q.shape[2]
        if self.attn_impl == "sdpa":
            if past == 0:
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
            mask = None if T == 1 else _causal_mask(T, past, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return _masked_softmax_attention(q, k, v, past, dropout, self.training)


def _causal_mask(T: int, past: int, device) -> torch.Tensor:
    """Boolean (T, past+T) mask: query i (at position past+i) sees keys 0..past+i."""
    rows = torch.arange(T, device=device)[:, None] + past
    return torch.arange(past + T, device=device)[None, :] <= rows


def _masked_softmax_attention(q, k, v, past: int, dropout: float, training: bool) -> torch.Tensor:
    """Attention spelled out: scaled scores, -inf above the diagonal, softmax, weighted sum."""
    T = q.shape[2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, nh, T, past+T)
    att = att.masked_fill(~_causal_mask(T, past, q.device), float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), p=dropout, training=training)
    return att @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT-2 language model: embeddings, blocks, final LayerNorm, head tied to wte."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of layers that write into the residual stream by 1/sqrt(N),
        # N = 2 * n_layer residual additions (Radford et al. 2019, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied embedding counted once; optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6N + 12*L*C*T (PaLM paper, app. B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd) for token ids idx (B, T)."""
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.block_size:
            raise MiniGPT2Error(
                f"sequence of {past + T} tokens is longer than the model's context "
                f"(block_size={self.config.block_size})"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab) for idx (B, T); with targets (B, T), also the mean cross-entropy.

        Targets equal to -1 are ignored, as in nanoGPT.
        """
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (and the position table) to block_size, e.g. to fine-tune cheaper."""
        if not 1 <= block_size <= self.config.block_size:
            raise MiniGPT2Error(
                f"block_size={block_size} must be between 1 and the model's "
                f"{self.config.block_size}"
            )
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight.detach()[:block_size].clone())
        wpe.num_embeddings = block_size

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **kwargs) -> GPT:
        """Load released GPT-2 weights from a directory or a Hub preset name (gpt2, ...)."""
        from .pretrained import load_pretrained

        return load_pretrained(name_or_dir, **kwargs)

    def save_pretrained(self, out_dir: str) -> None:
        """Write config.json + model.safetensors in the released GPT-2 layout."""
        from .pretrained import save_pretrained

        save_pretrained(self, out_dir)

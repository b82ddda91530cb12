"""Causal self-attention with optional padding masks, and the key/value cache of decoding."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import GPTConfig


class KVCache:
    """Preallocated keys and values of every layer, filled as tokens are generated.

    With padded rows it also remembers which stored keys are real tokens (`mask`) and how
    many real tokens each row holds (`seen`), from which the next positions follow.
    """

    def __init__(self, config: GPTConfig, batch: int, length: int, device, dtype) -> None:
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, 2, batch, config.n_head, length, hd)
        if torch.device(device).type == "cpu" and dtype is torch.bfloat16:
            dtype = torch.float32  # attention runs in float32 there (see forward): store it so
        self.kv = torch.empty(shape, device=device, dtype=dtype)  # only [:pos] is ever read
        self.pos = 0  # tokens already stored (padding included)
        self.mask: torch.Tensor | None = None  # (batch, length) bool once padding was stored
        self.seen: torch.Tensor | None = None  # (batch,) real tokens stored per row
        self.lengths: torch.Tensor | None = None  # slots only: (batch,) tokens stored per row
        self.live: torch.Tensor | None = None  # slots only: (batch,) rows a step moves on
        # slots only: a faster attention for one-token steps, (layer, qkv (B, 3C)) -> (B, C)
        # float32, storing the keys and values itself (decode.native.slots_attention)
        self.attend = None

    @classmethod
    def slots(cls, config: GPTConfig, slots: int, length: int, device, dtype) -> KVCache:
        """A cache of independent sequences, each at its own length (continuous batching):
        row i holds columns [0, lengths[i]), a step writes each live row at its own length and
        moves it on. Each row's memory is one contiguous one-sequence cache (see row())."""
        out = cls(config, 1, 1, device, dtype)
        hd = config.n_embd // config.n_head
        store = (slots, config.n_layer, 2, config.n_head, length, hd)
        # zeros: the columns past a row's length are multiplied by 0 in attention, never NaN
        out.kv = torch.zeros(store, device=device, dtype=out.kv.dtype).permute(1, 2, 0, 3, 4, 5)
        out.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        out.live = torch.zeros(slots, dtype=torch.bool, device=device)
        return out

    def row(self, i: int) -> KVCache:
        """Slot i as a one-sequence cache over the same memory (for a prompt or a native
        step), at that slot's length; set lengths[i] from its pos afterwards."""
        out = KVCache.__new__(KVCache)
        out.kv = self.kv[:, :, i : i + 1]  # (n_layer, 2, 1, n_head, length, hd), contiguous
        out.pos, out.mask, out.seen = int(self.lengths[i]), None, None
        out.lengths = out.live = out.attend = None
        return out

    def reset(self) -> None:
        """Forget everything stored (the buffers are reused)."""
        self.pos, self.mask, self.seen = 0, None, None

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache holding copies of these rows (repeats allowed: one context, several
        continuations), with the same room left."""
        out = KVCache.__new__(KVCache)
        out.kv, out.pos = self.kv[:, :, rows], self.pos
        out.mask = None if self.mask is None else self.mask[rows]
        out.seen = None if self.seen is None else self.seen[rows]
        out.lengths = out.live = out.attend = None
        return out

    def mark_filled(self, real: torch.Tensor) -> None:
        """Declare the first real.shape[1] columns written, with real (B, width) marking the
        real tokens among them (a left-padded prompt batch written row by row)."""
        width = real.shape[1]
        shape = (self.kv.shape[2], self.kv.shape[4])
        self.mask = torch.zeros(shape, dtype=torch.bool, device=real.device)
        self.mask[:, :width] = real
        self.seen, self.pos = real.sum(1), width


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

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, mask=None):
        """mask: None (causal only) or a (B, 1, T, past+T) boolean of the keys each query sees."""
        B, T, C = x.shape
        projected = self.c_attn(x)
        if cache is not None and cache.attend is not None and T == 1:
            y = cache.attend(layer, projected.view(B, 3 * C)).to(x.dtype).view(B, T, C)
            return self.resid_dropout(self.c_proj(y))
        # (3, B, nh, T, hs) in one view: q, k and v, and k with v for the cache in one copy
        qkv = projected.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        past = 0
        if cache is not None and cache.lengths is not None:  # slots: each row at its length
            rows, at = torch.arange(B, device=x.device), cache.lengths[:B]
            new = qkv[1:, :, :, 0].transpose(0, 1).to(cache.kv.dtype)  # (B, 2, nh, hs)
            cache.kv[layer, :, rows, :, at] = new  # index_put: no casting of its own
            k, v = cache.kv[layer, :, :B, :, : int(at.max()) + 1].unbind(0)
        elif cache is not None:  # append this step's keys and values, attend over all so far
            past = cache.pos
            cache.kv[layer, :, :, :, past : past + T] = qkv[1:]
            k, v = cache.kv[layer, :, :, :, : past + T].unbind(0)  # (B, nh, past+T, hs) each
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype is torch.bfloat16:
            # torch's CPU attention is slow in bfloat16: its flash-attention backward ~8x
            # slower than float32 (4.6 ms vs 0.54 ms per call at B=12, T=64, C=128), and one
            # decoding query over 120 keys 68 us against 12 us. Attention is a small share of
            # the FLOPs, so it runs in float32 and the matmuls stay bfloat16.
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), past, dropout, mask)
            y = y.to(q.dtype)
        else:
            y = self._attend(q, k, v, past, dropout, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-join heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q, k, v, past: int, dropout: float, mask) -> torch.Tensor:
        """(B, nh, T, hs) outputs of q attending over k, v (causal, or as mask allows)."""
        T = q.shape[2]
        if self.attn_impl == "math":
            if mask is None:
                mask = _causal_mask(T, past, q.device)
            return _masked_softmax_attention(q, k, v, mask, dropout, self.training)
        if mask is None and past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        if mask is None and T > 1:
            mask = _causal_mask(T, past, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def _causal_mask(T: int, past: int, device) -> torch.Tensor:
    """Boolean (T, past+T) mask: query i (at position past+i) sees keys 0..past+i."""
    rows = torch.arange(T, device=device)[:, None] + past
    return torch.arange(past + T, device=device)[None, :] <= rows


def padding_mask(keys: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, S) boolean: the last T of S positions see earlier real keys (keys: (B, S)).

    Each query also sees itself, so a query on padding (whose window may hold no real key)
    gets a finite softmax instead of NaN; real queries are unaffected, their own key is real.
    """
    S = keys.shape[1]
    rows = torch.arange(T, device=keys.device)[:, None] + S - T  # query i sits at S-T+i
    cols = torch.arange(S, device=keys.device)[None, :]
    return ((cols <= rows) & (keys[:, None, :] | (cols == rows)))[:, None]


def _masked_softmax_attention(q, k, v, mask, dropout: float, training: bool) -> torch.Tensor:
    """Attention spelled out: scaled scores, -inf where mask is False, softmax, weighted sum."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, nh, T, past+T)
    att = att.masked_fill(~mask, float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), p=dropout, training=training)
    return att @ v  # (B, nh, T, hs)

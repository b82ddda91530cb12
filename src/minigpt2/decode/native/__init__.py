"""The native decoder (native.c, built by pip install where a C compiler is present): GPT-2's
one-token step in one call (for one sequence, or a few slots of a server's cache), and matrix
products with a few rows, on x86-64 CPUs with AVX-512 or AVX2.

Decoding in PyTorch spends a quarter of a gpt2 token outside the matrix-vector products
(about 250 small operations, each dispatched from Python); the native step runs them all on
torch's threads between the products (BENCHMARKS.md). Without the library, or on another CPU,
`native_available()` is False and minigpt2 decodes in PyTorch. What holds between the two: in
float32, the same logits to about 1e-6 relative and so the same greedy tokens (bar exact
ties). In bfloat16 and int8 they part: the native step multiplies the weights with float32
activations, PyTorch rounds activations (and int8 scales) to bfloat16 between operations, so
greedy tokens agree for a while and then may differ (from token 20 in one try); the native
logits are the ones nearer the float32 model's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import weakref
from ctypes import POINTER, c_float, c_int, c_int32, c_void_p
from functools import cache

import torch
from torch import nn

from ...errors import MiniGPT2Error
from ...model.attention import KVCache
from ...model.gpt import GPT, SinusoidalPositions
from ...model.lora import LoRALinear

TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # native.h's F32, BF16, INT8

# Each layer's description for native_linear, built on first use: (weight address, struct,
# what it points into). Not kept on the layer, whose copies and pickles must not carry it.
_described: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Linear(ctypes.Structure):
    _fields_ = [("w", c_void_p), ("b", c_void_p), ("scale", c_void_p)] + [
        (name, c_int32) for name in ("rows", "cols", "type")
    ]


class _Block(ctypes.Structure):
    _fields_ = [(name, c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")] + [
        (name, _Linear) for name in ("attn", "attn_proj", "fc", "fc_proj")
    ]


class _Model(ctypes.Structure):
    _fields_ = (
        [("blocks", POINTER(_Block))]
        + [(name, c_void_p) for name in ("wte", "wpe", "lnf_w", "lnf_b")]
        + [("head", _Linear), ("kv", c_void_p), ("work", c_void_p)]
        + [(name, c_int32) for name in ("n_layer", "n_head", "n_embd", "room", "threads")]
        + [("wte_type", c_int32), ("gelu_exact", c_int32), ("eps", c_float)]
        + [("tok_scale", c_float), ("work_floats", ctypes.c_int64)]
    )


@cache
def _library() -> ctypes.CDLL | None:
    """The built native.c with its signatures, or None where it was not built or cannot run."""
    spec = importlib.util.find_spec("minigpt2.decode.native._native")
    if spec is None or spec.origin is None:
        return None
    return open_library(spec.origin)


def open_library(path: str) -> ctypes.CDLL | None:
    """A build of native.c at path with its signatures set, or None where this CPU cannot run it."""
    lib = ctypes.CDLL(path)
    lib.mg2_supported.restype = c_int
    if not lib.mg2_supported():
        return None
    lib.mg2_use_level.restype = c_int
    lib.mg2_use_level.argtypes = [c_int]
    lib.mg2_work_floats.restype = ctypes.c_long
    lib.mg2_work_floats.argtypes = [c_int, c_int, c_int, c_int]
    lib.mg2_step.argtypes = [POINTER(_Model), c_int, c_int, c_void_p]
    if hasattr(lib, "mg2_step_rows"):  # builds of earlier revisions lack it (benchmarks)
        lib.mg2_step_rows.restype = c_int
        rows = [POINTER(c_int32)] * 2  # tokens, slots
        lib.mg2_step_rows.argtypes = [POINTER(_Model), c_int, *rows, c_void_p, c_int] + [
            ctypes.c_long, c_int, c_void_p
        ]  # fmt: skip
    lib.mg2_linear.argtypes = [POINTER(_Linear), c_void_p, c_void_p, c_int, c_int]
    if hasattr(lib, "mg2_attend_slots"):  # builds of earlier revisions lack it (benchmarks)
        lib.mg2_attend_slots.restype = c_int
        lib.mg2_attend_slots.argtypes = (
            [c_void_p, ctypes.c_long] + [c_int] * 4 + [c_void_p, c_int] + [c_void_p] * 3 + [c_int]
        )
    return lib


def native_available() -> bool:
    """Whether the native decoder was built, this CPU runs it (x86-64 with AVX-512 or AVX2),
    and it is not switched off (MINIGPT2_NATIVE=0, or --no-native on the command line)."""
    return os.environ.get("MINIGPT2_NATIVE", "1") != "0" and _library() is not None


def _versions(*tensors: torch.Tensor | None) -> tuple:
    """Where each tensor lives and how often it was changed in place: a copy made from it
    is stale when either moved (load_state_dict keeps the address, not the version)."""
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


_LEVELS = {"avx2": 1, "avx512": 2, "avx512bf16": 3}  # native.c's levels


def instruction_sets() -> list[str]:
    """The vector instruction sets this CPU runs the native kernels in, lowest first."""
    lib = _library()
    best = lib.mg2_supported() if lib is not None else 0
    return [name for name, level in _LEVELS.items() if level <= best]


def instruction_set(wanted: str | None = None) -> str:
    """Run the native kernels in `wanted` ("avx512bf16", "avx512" or "avx2", at most the CPU's
    best; to test or measure one), or in the CPU's best (None); returns the set in effect.
    Process-wide."""
    lib = _library()
    if lib is None:
        raise MiniGPT2Error("the native decoder is not built, or this CPU has neither set")
    level = lib.mg2_use_level(_LEVELS[wanted] if wanted else -1)
    return {v: k for k, v in _LEVELS.items()}[level]


def linear_struct(layer: nn.Module, keep: list[torch.Tensor]) -> _Linear:
    """layer (nn.Linear, or quantize.Int8Linear) as native.c's Linear, pointing at its own
    weight; float32 copies of its bias and scales go into keep, which must outlive it."""
    w = layer.weight.detach()
    if not w.is_contiguous() or w.dtype not in TYPES or w.device.type != "cpu":
        raise ValueError("the native decoder reads row-major float32, bfloat16 or int8 weights")
    keep.append(w)
    return _Linear(
        w=w.data_ptr(),
        b=_float_copy(layer.bias, keep),
        scale=_float_copy(getattr(layer, "scales", None), keep),
        rows=w.shape[0],
        cols=w.shape[1],
        type=TYPES[w.dtype],
    )


def _float_copy(t: torch.Tensor | None, keep: list[torch.Tensor]) -> int | None:
    """Address of t as float32 and contiguous (t itself when it already is), kept in keep."""
    if t is None:
        return None
    t = t.detach().float().contiguous()
    keep.append(t)
    return t.data_ptr()


def native_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a few rows in native.c: each weight read once for all rows, in float32."""
    if x.device.type != "cpu" or x.shape[-1] != layer.weight.shape[1]:
        raise MiniGPT2Error(
            f"native linear: input of width {x.shape[-1]} on {x.device}, the layer takes "
            f"{layer.weight.shape[1]} on the CPU"
        )
    state = _versions(layer.weight, layer.bias, getattr(layer, "scales", None))
    built = _described.get(layer)
    if built is None or built[0] != state:  # weights replaced or changed: describe anew
        keep: list[torch.Tensor] = []
        built = (state, linear_struct(layer, keep), keep)
        _described[layer] = built
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = torch.empty(rows.shape[0], built[1].rows)
    _library().mg2_linear(
        ctypes.byref(built[1]), rows.data_ptr(), out.data_ptr(), rows.shape[0],
        torch.get_num_threads(),
    )  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def slots_attention(cache: KVCache):
    """A native attention for cache's one-token steps (KVCache.attend): each row over its own
    slot, with no padding to the longest row, or None where native.c cannot (not built, not a
    float32 slot cache on the CPU). gpt2, 4 rows: 0.3 ms a layer in torch's SDPA (BENCHMARKS.md,
    serving)."""
    storage = cache.kv.permute(2, 0, 1, 3, 4, 5)  # (slots, n_layer, 2, n_head, room, hd)
    usable = cache.lengths is not None and cache.kv.device.type == "cpu"
    if not (native_available() and usable and cache.kv.dtype is torch.float32):
        return None
    if not storage.is_contiguous():
        return None
    n_layer, _, n_head, room, hd = storage.shape[1:]
    slot_floats, width = storage[0].numel(), n_head * hd
    scratch: list[torch.Tensor] = []  # threads * room floats, grown when threads grow

    def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """(B, n_embd) float32 attention outputs of qkv (B, 3 n_embd), storing keys, values."""
        rows = qkv.shape[0]
        qkv = qkv.float().contiguous()
        lengths = cache.lengths[:rows].contiguous()
        threads = torch.get_num_threads()
        if not scratch or scratch[0].numel() < threads * room:
            scratch[:] = [torch.empty(threads * room)]
        out = torch.empty(rows, width)
        status = _library().mg2_attend_slots(
            storage.data_ptr(), slot_floats, room, n_head, width, layer, lengths.data_ptr(),
            rows, qkv.data_ptr(), out.data_ptr(), scratch[0].data_ptr(), threads,
        )  # fmt: skip
        if status != 0:
            raise MiniGPT2Error(f"a slot's length is past the cache's {room} positions")
        return out

    return attend


PACKED_FROM = 2  # rows above which a layer's packed copy, where it has one, multiplies


class NativeLinear(nn.Linear):
    """A linear layer for CPU decoding: up to ROWS rows (a decode step of that many sequences)
    in native.c, more (a prompt) in torch. Same parameters as the nn.Linear it replaces."""

    ROWS = 8  # a layer's own `rows`, where set, overrides it (a server's batch: serve/engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        readable = w.dtype in TYPES and w.device.type == "cpu"  # not after .half() or .cuda()
        if torch.is_grad_enabled() or not readable:
            return super().forward(x)
        n, packed = x.shape[:-1].numel(), self.__dict__.get("packed")
        if packed is not None and n > PACKED_FROM:
            return packed(x)  # a copy in oneDNN's layout, where one was made (kernels.py)
        if n > getattr(self, "rows", self.ROWS):
            return super().forward(x)
        return native_linear(self, x)


def _reads(model: GPT) -> bool:
    """Whether native.c runs here and model's weights are of a kind it reads (on the CPU)."""
    weight = model.transformer.wte.weight
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        return False  # adapters add B A x to the base product: native.c reads the base alone
    return native_available() and weight.device.type == "cpu" and weight.dtype in TYPES


def use_native_linears(model: GPT) -> bool:
    """Run the few-row products of model's linear layers (the head too) in native.c, where it
    runs and the weights are float32 or bfloat16 on the CPU; whether it did."""
    if not _reads(model):
        return False
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = NativeLinear
    return True


class NativeDecoder:
    """GPT-2's one-token step in native.c, for one sequence (step) or several slots of a slot
    cache (step_slots), reading the model's own weights (float32, bfloat16, or int8 from
    quantize_for_decoding) in place; keys and values go into the float32 KVCache that the
    PyTorch model fills for the prompt."""

    def __init__(self, model: GPT) -> None:
        cfg, t = model.config, model.transformer
        self._keep: list[torch.Tensor] = []  # what the C structs point into
        blocks = (_Block * cfg.n_layer)()
        for block, b in zip(t.h, blocks, strict=True):
            b.ln1_w, b.ln1_b = self._vector(block.ln_1.weight), self._vector(block.ln_1.bias)
            b.ln2_w, b.ln2_b = self._vector(block.ln_2.weight), self._vector(block.ln_2.bias)
            b.attn = linear_struct(block.attn.c_attn, self._keep)
            b.attn_proj = linear_struct(block.attn.c_proj, self._keep)
            b.fc = linear_struct(block.mlp.c_fc, self._keep)
            b.fc_proj = linear_struct(block.mlp.c_proj, self._keep)
        head = linear_struct(model.lm_head, self._keep)
        m = _Model(blocks=ctypes.cast(blocks, POINTER(_Block)), head=head)
        wte = t.wte.weight.detach()
        self._keep.append(wte)
        m.wte, m.wte_type = wte.data_ptr(), TYPES[wte.dtype]
        positions = t.wpe.table if isinstance(t.wpe, SinusoidalPositions) else t.wpe.weight
        m.wpe, self.block = self._vector(positions), positions.shape[0]
        m.lnf_w, m.lnf_b = self._vector(t.ln_f.weight), self._vector(t.ln_f.bias)
        m.n_layer, m.n_head, m.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        m.gelu_exact, m.eps = cfg.gelu == "exact", cfg.layer_norm_epsilon
        # Vaswani et al.'s token scaling, as GPT.hidden_states applies it
        m.tok_scale = cfg.n_embd**0.5 if cfg.pos_embedding == "sinusoidal" else 1.0
        m.threads = torch.get_num_threads()
        self.model, self._blocks = m, blocks
        self.logits = torch.empty(1, head.rows)
        self._work = torch.empty(0)
        self._rows_logits = torch.empty(0, head.rows)  # step_slots' logits
        self._slot_cache: tuple = (None, None)  # step_slots' cache and its layout
        self._source = model
        self._pointers = self._weights_of(model)

    @classmethod
    def for_model(cls, model: GPT) -> NativeDecoder | None:
        """A decoder for model where native.c runs it: CPU weights it reads (not oneDNN's
        packed ones) and no training-time pieces (dropout); otherwise None."""
        if not _reads(model) or model.training:
            return None
        try:
            return cls(model)
        except (ValueError, AttributeError, RuntimeError):  # packed (no storage) or foreign layers
            return None

    @staticmethod
    def _weights_of(model: GPT) -> tuple:
        return _versions(*model.parameters(), *model.buffers())

    def current(self) -> bool:
        """Whether the model still holds the weights this decoder reads, unchanged (not moved,
        replaced or written in place since): a float32 copy of a bias would not see a new one."""
        return self._weights_of(self._source) == self._pointers

    def fits(self, cache: KVCache | None, ids: torch.Tensor) -> bool:
        """Whether this step runs natively: one sequence, one new token, an unpadded float32
        cache of this model's shape on the CPU."""
        if cache is None or ids.shape != (1, 1) or cache.mask is not None:
            return False
        return self._cache_fits(cache)

    def _cache_fits(self, cache: KVCache) -> bool:
        """Whether cache is a float32 CPU cache of this model's shape for one sequence."""
        m, kv = self.model, cache.kv
        shape = (m.n_layer, 2, 1, m.n_head, kv.shape[4], m.n_embd // m.n_head)
        return kv.shape == shape and kv.dtype is torch.float32 and kv.is_cpu and kv.is_contiguous()

    def _vector(self, t: torch.Tensor | None) -> int | None:
        return _float_copy(t, self._keep)

    def step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits (1, vocab) after token, which sits at cache.pos; its key and value are
        stored there and cache.pos moves on by one. The tensor is reused by the next step."""
        if not self._cache_fits(cache):
            raise MiniGPT2Error(
                f"native step: a cache of shape {tuple(cache.kv.shape)} ({cache.kv.dtype}) is "
                "not this model's float32 one-sequence cache on the CPU"
            )
        room = cache.kv.shape[4]
        if not (0 <= token < self.model.head.rows and 0 <= cache.pos < min(room, self.block)):
            raise MiniGPT2Error(
                f"native step: token {token} (vocabulary {self.model.head.rows}) at position "
                f"{cache.pos} of a cache of {room} (the model has {self.block} positions)"
            )
        self._scratch(room, 1)
        self.model.kv = cache.kv.data_ptr()
        _library().mg2_step(ctypes.byref(self.model), token, cache.pos, self.logits.data_ptr())
        cache.pos += 1
        return self.logits

    def _scratch(self, room: int, rows: int) -> None:
        """Scratch for a step of rows rows over a cache of room positions on torch's threads
        (read each step: torch.set_num_threads may change them); grown, never shrunk."""
        threads, m = torch.get_num_threads(), self.model
        need = _library().mg2_work_floats(m.n_embd, room, threads, rows)
        if m.room != room or m.threads != threads or m.work_floats < need:
            self._work = torch.empty(need)
            m.work, m.room, m.threads, m.work_floats = self._work.data_ptr(), room, threads, need

    def step_slots(self, tokens: list[int], slots: list[int], cache: KVCache) -> torch.Tensor:
        """Logits (rows, vocab) after one new token for each of several sequences of a slot
        cache (KVCache.slots): tokens[i] at slot slots[i]'s length, where its key and value
        are stored; those lengths move on by one. A server's step of a few rows: all of it in
        native.c, where PyTorch spent more time around a batch's products than in them. The
        tensor is reused by the next step."""
        if self._slot_cache[0] is not cache:
            self._slot_cache = (cache, self._slot_layout(cache))
        count, slot_floats, room = self._slot_cache[1]
        m, rows = self.model, len(tokens)
        self._scratch(room, rows)
        if self._rows_logits.shape[0] < rows:
            self._rows_logits = torch.empty(rows, m.head.rows)
        ids, where = (c_int32 * rows)(*tokens), (c_int32 * rows)(*slots)
        m.kv = cache.kv.data_ptr()  # the storage's start: slot 0 (_slot_layout)
        status = _library().mg2_step_rows(
            ctypes.byref(m), rows, ids, where, cache.lengths.data_ptr(), count, slot_floats,
            self.block, self._rows_logits.data_ptr(),
        ) if rows else -1  # fmt: skip
        if status != 0:
            raise MiniGPT2Error(
                f"native step: tokens {tokens} at slots {slots}: one is out of range "
                f"(vocabulary {m.head.rows}, {count} slots of {room} positions, lengths "
                f"{cache.lengths.tolist()}, {self.block} positions in the model) or two rows "
                "share a slot"
            )
        return self._rows_logits[:rows]

    def _slot_layout(self, cache: KVCache) -> tuple[int, int, int]:
        """(slots, floats a slot, room) of a slot cache this step can run on, or the error."""
        m, kv = self.model, cache.kv
        storage = kv.permute(2, 0, 1, 3, 4, 5)  # (slots, n_layer, 2, n_head, room, hd)
        shape = (m.n_layer, 2, m.n_head, kv.shape[4], m.n_embd // m.n_head)
        lengths = cache.lengths
        fits = kv.dtype is torch.float32 and kv.is_cpu and lengths is not None
        fits = fits and lengths.dtype is torch.int64 and lengths.is_contiguous()
        if not (fits and storage.is_contiguous() and tuple(storage.shape[1:]) == shape):
            raise MiniGPT2Error(
                f"native step: a cache of shape {tuple(kv.shape)} ({kv.dtype}) is not this "
                "model's float32 slot cache on the CPU"
            )
        return storage.shape[0], storage[0].numel(), shape[3]

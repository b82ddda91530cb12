"""GPTConfig: the shape and regularisation of a GPT-2, and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import MiniGPT2Error

POS_EMBEDDINGS = ("learned", "sinusoidal")


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
    pos_embedding: str = "learned"  # "learned" (GPT-2's) or "sinusoidal" (fixed; Vaswani et al.)
    gelu: str = "tanh"  # "tanh" (GPT-2's approximation) or "exact" (erf: nanoGPT's nn.GELU)
    labels: tuple[str, ...] = ()  # class names by id; any: a `score` head classifies sequences

    def __post_init__(self) -> None:
        self.labels = tuple(str(name) for name in self.labels)  # JSON gives a list
        if len(set(self.labels)) != len(self.labels):
            raise MiniGPT2Error(f"model config: labels {list(self.labels)} name a class twice")
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
        if self.gelu not in ("tanh", "exact"):
            raise MiniGPT2Error(f"model config: gelu={self.gelu!r}; use tanh or exact")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise MiniGPT2Error(
                f"model config: pos_embedding={self.pos_embedding!r}; use learned or sinusoidal"
            )

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

"""A model as one GGUF file, the format llama.cpp (and Ollama, LM Studio, ...) runs.

Written with the `gguf` package, the ggml project's own writer, with the metadata, tensor names
and vocabulary that llama.cpp's convert_hf_to_gguf.py writes for GPT-2 (architecture `gpt2`,
pre-tokenizer `gpt-2`), so a file from here and one converted from our released-layout export
load alike. Norms, biases and the position table stay float32, as the converter keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.tokenizer import Tokenizer
from ..errors import MiniGPT2Error
from ..model.gpt import GPT
from .checkpoint import write_atomic
from .hf_tokenizer import EOT_TEXT, tokenizer_tables
from .released import CONV1D_WEIGHTS, released_state

# outtype -> (ggml tensor type name, llama.cpp file type: gguf.LlamaFileType's values)
OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
# the released layout's names (pretrained.released_state) -> llama.cpp's, per block or whole
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_TOP_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5  # gguf.TokenType
_QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION


def gguf_name(key: str) -> str:
    """llama.cpp's tensor name for a released-layout key (h.3.attn.c_attn.weight -> ...)."""
    module, kind = key.rsplit(".", 1)
    if module.startswith("h."):
        _, block, rest = module.split(".", 2)
        return f"blk.{block}.{_BLOCK_NAMES[rest]}.{kind}"
    return f"{_TOP_NAMES[module]}.{kind}"


def gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int):
    """(tokens, token types, merges) as the converter writes them; ids past the tokenizer's are
    padding ([PAD<id>], unused), as for nanoGPT's 50304-row embeddings."""
    vocab, merges = tokenizer_tables(tokenizer)
    by_id = {i: text for text, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i == tokenizer.eot_id:
            tokens.append(EOT_TEXT)
            types.append(_TOKEN_CONTROL)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(_TOKEN_NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
    return tokens, types, [f"{a} {b}" for a, b in merges]


def _tensor(gguf, name: str, value: np.ndarray, outtype: str):
    """(data, ggml type) of one tensor: 2-D weights in outtype, the rest float32."""
    kind = gguf.GGMLQuantizationType
    if value.ndim < 2 or name.endswith("_norm.weight") or name.startswith("position_embd"):
        return value, kind.F32
    qtype = kind[OUTTYPES[outtype][0]]
    if qtype == kind.F32:
        return value, qtype
    if qtype == kind.F16:
        return value.astype(np.float16), qtype
    try:
        return gguf.quants.quantize(value, qtype), qtype
    except gguf.QuantError:  # a row not a multiple of the block size: f16, as the converter does
        return value.astype(np.float16), kind.F16


def check_outtype(outtype: str) -> None:
    """Refuse a tensor type this writer does not produce."""
    if outtype not in OUTTYPES:
        raise MiniGPT2Error(f"unknown outtype {outtype!r}; use one of: {', '.join(OUTTYPES)}")


def check_gguf_export(model: GPT, tokenizer: Tokenizer | None, outtype: str) -> None:
    """Refuse, before writing anything, what a GGUF file for llama.cpp cannot hold."""
    check_outtype(outtype)
    if model.config.labels:
        raise MiniGPT2Error(
            "a classifier (a score head) has no GGUF form llama.cpp runs; export a directory, "
            "which transformers loads as GPT2ForSequenceClassification"
        )
    if model.config.pos_embedding != "learned":
        raise MiniGPT2Error(
            f"llama.cpp's gpt2 architecture has learned positions; a model with "
            f"pos_embedding={model.config.pos_embedding} can't be written as GGUF"
        )
    if tokenizer is None:
        raise MiniGPT2Error(
            "a GGUF file carries its vocabulary: name the model's tokenizer with --tokenizer "
            "(gpt2, path/to/gpt2.tiktoken or byte)"
        )
    if not tokenizer_tables(tokenizer)[1]:
        raise MiniGPT2Error(
            f"llama.cpp's GPT-2 tokenizer needs BPE merges and the {tokenizer.name} tokenizer has "
            "none; export a directory instead (transformers loads it with its tokenizer)"
        )
    try:  # here, and only a check: the optional [gguf] extra
        import gguf  # noqa: F401
    except ImportError:
        raise MiniGPT2Error(
            "writing GGUF needs the gguf package: pip install gguf (or minigpt2[gguf])"
        ) from None


def write_gguf(model: GPT, path: str | os.PathLike, tokenizer: Tokenizer, outtype: str) -> None:
    """Write model and its vocabulary to path (atomically) as llama.cpp's GPT-2 GGUF."""
    # here: the optional [gguf] extra, wanted by GGUF export only
    import gguf

    check_gguf_export(model, tokenizer, outtype)
    config = model.config
    tokens, types, merges = gguf_vocabulary(tokenizer, config.vocab_size)
    eot = tokenizer.eot_id

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "gpt2")
        w.add_type("model")
        w.add_name(Path(path).stem)
        w.add_size_label(gguf.size_label(model.num_params(non_embedding=False), 0, 0, 0))
        w.add_block_count(config.n_layer)
        w.add_context_length(config.block_size)
        w.add_embedding_length(config.n_embd)
        w.add_feed_forward_length(4 * config.n_embd)
        w.add_head_count(config.n_head)
        w.add_layer_norm_eps(config.layer_norm_epsilon)
        w.add_file_type(OUTTYPES[outtype][1])
        w.add_quantization_version(_QUANTIZATION_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for add in (w.add_bos_token_id, w.add_eos_token_id, w.add_unk_token_id):
            add(eot)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        for key, value in released_state(model).items():
            if key.endswith(CONV1D_WEIGHTS):
                value = value.t()  # back to (out, in): ggml's row-major rows are outputs
            name = gguf_name(key)
            data, qtype = _tensor(gguf, name, value.contiguous().numpy(), outtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomic(Path(path), write)

"""Released GPT-2 weights: the one place that maps them to and from this project's model.

The published layout (openai-community/gpt2 and siblings) is a directory holding config.json and
model.safetensors (older copies: pytorch_model.bin). Its linear weights come from GPT-2's
Conv1D and are stored (in_features, out_features), the transpose of nn.Linear. Key names
appear with or without a `transformer.` prefix, and may carry the causal-mask buffers
`h.N.attn.bias` / `h.N.attn.masked_bias`, which are not parameters.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import MiniGPT2Error
from ..model.config import GPTConfig
from ..model.gpt import GPT, RELEASED_LAYOUT
from .checkpoint import write_atomic
from .hf_tokenizer import write_tokenizer_files

HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# transformers' activation names -> GPTConfig.gelu ("gelu_new" is GPT-2's tanh approximation)
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_CONFIG_FILE = "config.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def resolve_pretrained_dir(name_or_dir: str | os.PathLike) -> Path:
    """A local directory in the released layout, downloading a preset name from the Hub."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_dir)
    repo = HUB_NAMES.get(name, name if name in HUB_NAMES.values() else None)
    if repo is None:
        raise MiniGPT2Error(
            f"{name!r} is neither a directory nor a released model; pass a directory holding "
            f"config.json and model.safetensors, or one of: {', '.join(HUB_NAMES)}"
        )
    # here for start-up time: huggingface_hub's download modules take about 0.3 s to import
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=[_CONFIG_FILE, "model.safetensors"]))
    except Exception as e:  # offline, no cache, Hub down: all mean "give me a local copy"
        raise MiniGPT2Error(
            f"could not fetch {repo!r} from the Hugging Face Hub ({type(e).__name__}); offline, "
            f"pass a local directory holding config.json and model.safetensors instead of {name!r}"
        ) from None


def config_from_hf(hf: dict, path: Path) -> GPTConfig:
    """Translate a transformers GPT2Config dict into a GPTConfig, refusing what we cannot run."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise MiniGPT2Error(f"{path}: model_type {hf.get('model_type')!r} is not gpt2")
    try:
        n_embd = int(hf["n_embd"])
        cfg = dict(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=n_embd,
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise MiniGPT2Error(f"{path}: missing or invalid field {e} in config.json") from None
    unsupported = {
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "activation_function": hf.get("activation_function", "gelu_new") not in ACTIVATIONS,
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is not True,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise MiniGPT2Error(f"{path}: unsupported GPT-2 variant ({', '.join(bad)} differ)")
    return GPTConfig(
        **cfg, gelu=ACTIVATIONS[hf.get("activation_function", "gelu_new")], labels=_labels(hf)
    )


def _labels(hf: dict) -> tuple[str, ...]:
    """A sequence classifier's class names by id (config.json's id2label); () for a language
    model, whose config carries transformers' default id2label too."""
    if "GPT2ForSequenceClassification" not in hf.get("architectures", ()):
        return ()
    names = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    try:
        return tuple(names[str(i)] for i in range(len(names)))
    except KeyError:
        raise MiniGPT2Error(f"id2label {names} does not number its classes 0..N-1") from None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the weight file(s) in directory, on the CPU."""

    st, index, pt = (directory / f for f in _WEIGHT_FILES)
    try:
        if st.is_file():
            return load_file(st)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in load_file(directory / s).items()}
        if pt.is_file():  # weights_only: never unpickle arbitrary objects
            return torch.load(pt, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiniGPT2Error(
            f"{directory}: weight file is truncated or corrupt ({first}); download it again"
        ) from None
    raise MiniGPT2Error(f"{directory}: no model.safetensors or pytorch_model.bin found")


def load_pretrained(
    name_or_dir: str | os.PathLike, *, dropout: float = 0.0, block_size: int | None = None
) -> GPT:
    """Build a GPT from released weights (a directory, or a preset name via the Hub)."""
    directory = resolve_pretrained_dir(name_or_dir)
    config_path = directory / _CONFIG_FILE
    if not config_path.is_file():
        raise MiniGPT2Error(f"{directory}: no config.json; is this a GPT-2 model directory?")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniGPT2Error(f"{config_path}: not valid JSON ({e})") from None
    config = config_from_hf(hf, config_path)
    config.dropout = dropout
    tensors = _read_tensors(directory)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = GPT(config)
    load_released_state(model, tensors, directory)
    if block_size is not None and block_size != config.block_size:
        model.crop_block_size(block_size)
    return model


def load_released_state(model: GPT, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Make released-layout tensors the model's parameters (a model built on the meta device
    takes them as they are), transposing Conv1D weights and checking shapes. tensors is
    emptied as it goes, so a large model is held once, not twice."""
    found = {}
    for key in list(tensors):
        value = tensors.pop(key)
        key = key.removeprefix("transformer.")
        if key.endswith(_MASK_BUFFERS) or key == "lm_head.weight":
            continue  # buffers that are not parameters; the head is tied to wte
        found[key] = value
    own = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    expected = {k.removeprefix("transformer."): k for k in own}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise MiniGPT2Error(
            f"{source}: weights do not match config.json (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}); the config and the weights come from different models"
        )
    state = {}
    for key, name in expected.items():
        value = found.pop(key)
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        if value.shape != own[name].shape:
            raise MiniGPT2Error(
                f"{source}: {key} has shape {tuple(value.shape)} but config.json "
                f"implies {tuple(own[name].shape)}; the config and weights do not match"
            )
        state[name] = value.to(torch.float32).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as in GPT-2


def released_state(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights in the published key spelling and orientation, head left tied. A
    bias=False model gets zero biases, which compute exactly what no bias does."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise MiniGPT2Error(
            "the head no longer shares the token embeddings (a merged lm_head LoRA adapter), "
            "which GPT-2's layout cannot hold; export the adapters with --adapter-only"
        )
    state = model.state_dict()
    with torch.device("meta"):
        full = GPT(replace(model.config, bias=True)).state_dict()
    out = {}
    for name, like in full.items():
        if name == "lm_head.weight":
            continue  # tied to wte; safetensors refuses two names for one tensor
        key = name.removeprefix("transformer.")
        value = state[name].detach() if name in state else torch.zeros(like.shape)
        value = value.to("cpu", torch.float32)
        out[key] = (value.t() if key.endswith(CONV1D_WEIGHTS) else value).contiguous()
    return out


def hf_config(config: GPTConfig, eot_id: int | None = None) -> dict:
    """config.json contents that transformers' GPT2Config reads back into the same shape."""
    eot = eot_id if eot_id is not None else min(50256, config.vocab_size - 1)
    classes = {}
    if config.labels:  # transformers' classifier reads the last token before pad_token_id
        classes = {
            "num_labels": len(config.labels),
            "id2label": dict(enumerate(config.labels)),
            "label2id": {name: i for i, name in enumerate(config.labels)},
            "pad_token_id": eot,
        }
    return {
        "architectures": ["GPT2ForSequenceClassification" if config.labels else "GPT2LMHeadModel"],
        **classes,
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def generation_config(eot_id: int) -> dict:
    """generation_config.json: end-of-text starts and ends a sequence, as for the released gpt2."""
    return {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}


def save_pretrained(model: GPT, out_dir: str | os.PathLike, tokenizer=None) -> list[str]:
    """Write config.json, model.safetensors, generation_config.json and, given the model's
    tokenizer, its files (vocab.json, merges.txt, tokenizer.json, ...). Each file goes to a
    temporary name renamed into place. Returns the names written."""
    model = getattr(model, "_orig_mod", model)
    if model.config.pos_embedding != "learned":
        raise MiniGPT2Error(
            "the released GPT-2 layout has only learned positions; a model with "
            f"pos_embedding={model.config.pos_embedding} can't be exported to it"
        )
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise MiniGPT2Error(
            f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiniGPT2Error(f"cannot create export directory {out}: {e.strerror}") from None
    eot = tokenizer.eot_id if tokenizer is not None else None
    weights = released_state(model)
    config = hf_config(model.config, eot)
    texts = {
        _CONFIG_FILE: json.dumps(config, indent=2),
        "generation_config.json": json.dumps(generation_config(config["eos_token_id"]), indent=2),
    }
    write_atomic(
        out / "model.safetensors", lambda p: save_file(weights, p, metadata={"format": "pt"})
    )
    for name, text in texts.items():
        write_atomic(out / name, lambda p, t=text: Path(p).write_text(t + "\n"))
    written = ["model.safetensors", *texts]
    if tokenizer is not None:
        written += write_tokenizer_files(tokenizer, out, model.config.block_size)
    return written


RELEASED_LAYOUT.update(load=load_pretrained, save=save_pretrained)  # GPT.from_pretrained's hook

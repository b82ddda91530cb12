"""What a run starts from: the model (fresh, released weights or another run's) and the data
(a text corpus or a file of records)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from ..data.batches import open_corpus
from ..data.labels import load_labelled
from ..data.preference import load_preferences
from ..data.records import RECORD_FORMATS, is_records_path, load_records, read_records
from ..data.tokenizer import Tokenizer
from ..errors import MiniGPT2Error
from ..formats import checkpoint as ckpt
from ..formats.loading import build_lora_model, find_checkpoint, load_model
from ..formats.released import load_pretrained
from ..model.config import GPTConfig
from ..model.gpt import GPT
from ..model.lora import adapters_off, apply_lora
from .config import TrainConfig
from .sharding import fill_shards, fill_with_init, rows_of_checkpoint, rows_of_model, sharded_model


def scratch_config(cfg: TrainConfig, tokenizer: Tokenizer) -> GPTConfig:
    """The shape of a model trained from scratch: a preset or n_layer/n_head/n_embd."""
    sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
    vocab = -(-tokenizer.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    shape = dict(
        vocab_size=vocab,
        block_size=cfg.block_size,
        dropout=cfg.dropout,
        bias=cfg.bias,
        attn_impl=cfg.attn_impl,
        pos_embedding=cfg.pos_embedding,
        **sizes,
    )
    if cfg.model:
        return GPTConfig.preset(cfg.model, **shape)
    missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in sizes]
    if missing:
        raise MiniGPT2Error(f"init_from=scratch needs model=PRESET or {', '.join(missing)}")
    return GPTConfig(**shape)


def start_model(
    cfg: TrainConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    resume: ckpt.CheckpointFile | None = None,
    labels: tuple[str, ...] = (),
) -> tuple[GPT, dict | None]:
    """The model a run trains, on device (sharded with fsdp), and its LoRA description; a
    classifier (labels given) with the parameters classifier_trainable names trainable. Under
    FSDP no process builds the whole model on a device, and a resume reads its rows only."""
    model, lora = _start_model(cfg, tokenizer, device, dtype, resume, labels)
    if labels and not lora and cfg.classifier_trainable != "all":
        last = f"transformer.h.{model.config.n_layer - 1}."
        keep = ("score.",) + ((last, "transformer.ln_f.") * (cfg.classifier_trainable != "head"))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))
    return model, lora


def _start_model(cfg, tokenizer, device, dtype, resume, labels):
    """start_model's model and LoRA description, every parameter as trained by default."""
    if cfg.fsdp and not dist.is_initialized():
        raise MiniGPT2Error("fsdp=true needs several processes: launch with torchrun")
    base_dtype = torch.bfloat16 if cfg.base_dtype == "bfloat16" else None
    if resume is not None:
        header = resume.header
        if header["tokenizer_hash"] != tokenizer.fingerprint:
            raise MiniGPT2Error(
                f"the run in {cfg.out_dir} was trained with tokenizer "
                f"{header['tokenizer']!r}, not {tokenizer.name!r}"
            )
        # the shape is the checkpoint's; dropout and attention kernel are the run's to choose
        runtime = {"dropout": cfg.dropout, "attn_impl": cfg.attn_impl}
        config = GPTConfig.from_dict({**header["model_config"], **runtime})
        if cfg.fsdp:
            model = sharded_model(config, device, dtype)
            fill_shards(model, rows_of_checkpoint(resume))
            return model, None
        tensors = {n: resume.tensor(n) for n in resume.names() if n.startswith("model.")}
        lora = header.get("lora")
        if lora:  # the base it names, and the adapters saved
            model = build_lora_model(
                tensors, header, str(resume.path), base_dtype, dropout=config.dropout
            )
            model.set_attn_impl(config.attn_impl)
        else:
            model = GPT(config)
            ckpt.load_model_tensors(model, tensors)
        return model.to(device), lora
    if cfg.fsdp and cfg.init_from == "scratch":
        model = sharded_model(scratch_config(cfg, tokenizer), device, dtype)
        fill_with_init(model)
        return model, None
    model = build_model(cfg, tokenizer)
    if labels:
        _give_labels(model, labels, cfg.init_from)
    if cfg.fsdp:  # weights to fine-tune: each rank keeps its rows
        sharded = sharded_model(model.config, device, dtype)
        fill_shards(sharded, rows_of_model(model))
        return sharded, None
    lora = {"base": cfg.init_from, **cfg.lora().to_dict()} if cfg.lora_r else None
    if lora:
        apply_lora(model, cfg.lora(), base_dtype)
    return model.to(device), lora


def _give_labels(model: GPT, labels: tuple[str, ...], source: str) -> None:
    """Make model a classifier of labels: a fresh head, or the one it has for those classes
    (class ids, as integer labels give, need only as many classes)."""
    have = model.config.labels
    if not have:
        model.set_labels(labels)
        return
    numbered = labels == tuple(str(i) for i in range(len(labels)))
    if have != labels and not (numbered and len(have) == len(labels)):
        raise MiniGPT2Error(
            f"init_from={source} classifies into {list(have)[:8]} but the data's labels are "
            f"{list(labels)[:8]}; use data with its labels, or start from a language model"
        )


@contextlib.contextmanager
def reference_model(cfg: TrainConfig, tokenizer: Tokenizer, model: GPT, device: torch.device):
    """DPO's reference: dpo_reference loaded for the block, or the starting model itself (with
    LoRA, with its adapters off: no second copy)."""
    if cfg.dpo_reference:
        other = build_model(replace(cfg, init_from=cfg.dpo_reference, dropout=0.0), tokenizer)
        if other.config.block_size < model.config.block_size:
            raise MiniGPT2Error(
                f"dpo_reference={cfg.dpo_reference} has a context of "
                f"{other.config.block_size} tokens, the model {model.config.block_size}"
            )
        yield other.to(device)
        return
    with adapters_off(model):
        yield model


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """A fresh model (scratch), or weights to fine-tune: released ones or a training checkpoint
    (an out_dir or a checkpoint file); resume is handled by start_model."""
    if cfg.init_from == "scratch":
        return GPT(scratch_config(cfg, tokenizer))
    if cfg.pos_embedding != "learned":
        raise MiniGPT2Error(
            f"pos_embedding={cfg.pos_embedding} applies to init_from=scratch; a model to "
            "fine-tune brings its own positions (leave pos_embedding unset)"
        )

    path = find_checkpoint(cfg.init_from)
    if path is None:
        model = load_pretrained(cfg.init_from, dropout=cfg.dropout)
    else:
        model, header = load_model(path, dropout=cfg.dropout)
        if header["tokenizer_hash"] != tokenizer.fingerprint:
            raise MiniGPT2Error(
                f"init_from={cfg.init_from} was trained with tokenizer {header['tokenizer']!r}"
                f"; pass --tokenizer={header.get('tokenizer_spec', header['tokenizer'])}"
            )
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise MiniGPT2Error(
            f"init_from={cfg.init_from} adapted lm_head with LoRA, which unties the head from "
            "the token embeddings; a model to train must keep them tied"
        )
    model.set_attn_impl(cfg.attn_impl)
    return model


def open_data(cfg: TrainConfig, tokenizer: Tokenizer, progress: bool):
    """(format, data): "text" and a prepared corpus, or a record format and its records."""
    if not cfg.data:
        raise MiniGPT2Error(
            "no training data: pass --data=PATH (a text file, a directory, "
            "a glob, stdlib, hf:NAME[:CONFIG], a prepared directory or a .json/.jsonl "
            "record file)"
        )
    if cfg.task == "classification":
        data = load_labelled(
            cfg.data, tokenizer, cfg.val_fraction, cfg.num_labels, None, cfg.hf_split
        )
        return data.format, data
    if cfg.objective == "dpo" or cfg.data_format == "preference":
        return _preferences(cfg, tokenizer)
    records = cfg.data_format in RECORD_FORMATS
    if cfg.data_format == "auto":
        records = is_records_path(cfg.data)
    if not records:
        corpus = open_corpus(
            cfg.data,
            tokenizer,
            cache_dir=cfg.data_cache or None,
            val_fraction=cfg.val_fraction,
            decode_errors=cfg.decode_errors,
            hf_split=cfg.hf_split,
            text_column=cfg.text_column,
            progress=progress,
        )
        return "text", corpus
    if not (is_records_path(cfg.data) or cfg.data.startswith("hf:")):
        raise MiniGPT2Error(
            f"data_format={cfg.data_format} reads a .json or .jsonl record file or an "
            f"hf:NAME dataset, not {cfg.data!r}"
        )
    data = load_records(
        cfg.data, cfg.data_format, tokenizer, cfg.val_fraction, cfg.mask_prompt, cfg.hf_split
    )
    return data.format, data


def _preferences(cfg: TrainConfig, tokenizer: Tokenizer):
    """(prompt template, pairs) of a DPO run's preference records."""
    if cfg.objective != "dpo":
        raise MiniGPT2Error("data_format=preference trains with --objective=dpo")
    if not (is_records_path(cfg.data) or cfg.data.startswith("hf:")):
        raise MiniGPT2Error(
            f"objective=dpo reads preference records from a .json or .jsonl file or an "
            f"hf:NAME dataset, not {cfg.data!r}"
        )
    records, source = read_records(cfg.data, cfg.hf_split)
    data = load_preferences(records, tokenizer, cfg.val_fraction, source)
    return data.format, data

"""Training configuration: one typed dataclass, read strictly from TOML files and --key=value.

Key names follow nanoGPT's train.py where one exists.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ..data.records import DATA_FORMATS
from ..data.sources import DECODE_ERRORS
from ..errors import MiniGPT2Error
from ..model.config import POS_EMBEDDINGS
from ..model.lora import LoRAConfig


@dataclass
class TrainConfig:
    """Every setting of a training run; see configs/*.toml for worked examples."""

    # run
    out_dir: str = "out"  # checkpoints, config.toml, metrics.jsonl and loss.png go here
    overwrite: bool = False  # a fresh run may replace the run already in out_dir
    init_from: str = "scratch"  # scratch | resume | a released model: gpt2, gpt2-medium, a dir
    eval_only: bool = False  # evaluate the starting model's loss and perplexity, then exit
    seed: int = 1337  # model init, data order and dropout all follow from it
    # data
    data: str = "stdlib"  # text file, directory, glob, stdlib, hf:NAME[:CONFIG], prepared dir
    tokenizer: str = "byte"  # byte | gpt2 | path/to/gpt2.tiktoken
    data_cache: str = ""  # where prepared corpora are cached ("" = ~/.cache/minigpt2/data)
    decode_errors: str = "strict"  # strict | replace: invalid UTF-8 is an error, or U+FFFD
    val_fraction: float = 0.1  # last fraction of the tokens held out for validation
    hf_split: str = "train"  # split of an hf: dataset
    text_column: str = "text"  # text column of an hf: dataset
    data_format: str = "auto"  # auto | text | instruction | prompt_completion | chat (records)
    mask_prompt: bool = True  # record data: the loss counts response tokens only
    # what the run learns (docs/finetuning.md)
    objective: str = "lm"  # lm: next-token loss | dpo: prefer chosen over rejected responses
    dpo_beta: float = 0.1  # DPO's beta: how far the policy may move from the reference
    dpo_loss: str = "sigmoid"  # sigmoid (DPO's) | ipo (Azar et al.'s squared loss)
    dpo_reference: str = ""  # DPO's reference, as init_from names one ("" = the starting model)
    task: str = "lm"  # lm | classification: text + label records, a score head on the last token
    num_labels: int = 0  # a classifier's classes (0 = as many as the labels name)
    classifier_trainable: str = "all"  # all | last_block (+ final LayerNorm and head) | head
    # model (for init_from=scratch; a released model brings its own shape)
    model: str = ""  # a preset (tiny, mini, small, gpt2, ...); n_layer etc. below override it
    n_layer: int = 0  # 0 = from the preset
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 256  # context; for a released model, a smaller value crops it
    dropout: float = 0.0
    bias: bool = True
    vocab_multiple: int = 1  # pad the vocabulary up to a multiple (64 makes GPT-2's 50304)
    attn_impl: str = "sdpa"  # sdpa | math
    pos_embedding: str = "learned"  # learned | sinusoidal (fixed sin/cos table; scratch only)
    # low-rank adapters (LoRA): train lora_r-rank updates of frozen weights; 0 = off
    lora_r: int = 0  # rank of the updates (PEFT's default for GPT-2: 8)
    lora_alpha: float = 16.0  # updates are scaled by lora_alpha / lora_r
    lora_dropout: float = 0.05  # on the adapters' input
    lora_targets: str = "c_attn"  # comma-separated: c_attn, c_proj, c_fc, attn.c_proj, ...
    base_dtype: str = "float32"  # float32 | bfloat16: how LoRA holds the frozen block weights
    activation_checkpointing: bool = False  # recompute blocks in the backward: less memory
    # optimisation
    batch_size: int = 12  # sequences per micro-step (per process)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    max_iters: int = 2000  # optimizer steps
    optimizer: str = "adamw"  # adamw | adam | muon (Muon on the blocks' matrices, AdamW beside)
    learning_rate: float = 1e-3  # peak, reached after warmup
    min_lr: float = 1e-4  # end of the decay
    warmup_iters: int = 100  # linear warmup from 0
    lr_decay_iters: int = 0  # 0 = max_iters
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # on matrices only, never biases, LayerNorms or embeddings
    # optimizer = "muon": torch.optim.Muon (Nesterov momentum orthogonalized by Newton-Schulz)
    muon_lr: float = 0.02  # its peak rate; the schedule scales it as it scales learning_rate
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # decoupled: w -= lr * muon_weight_decay * w
    muon_adjust_lr: str = "original"  # original: lr*sqrt(max(1, out/in)); or match_rms_adamw
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between evaluations (and always at the end)
    eval_iters: int = 20  # batches per split per evaluation
    hellaswag: str = ""  # HellaSwag JSONL or hf:Rowan/hellaswag, scored at every evaluation
    hellaswag_examples: int = 0  # how many of its examples (0 = all)
    log_interval: int = 10  # steps between metrics.jsonl lines
    checkpoint_interval: int = 250  # steps between checkpoints (and always at the end)
    sample_tokens: int = 200  # tokens sampled from the final model (0 = none)
    sample_prompt: str = "\n"
    progress: bool = True  # tqdm progress bar
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; fp16 uses a grad scaler)
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU threads for torch (0 = one per core idle at the start)
    fsdp: bool = False  # under torchrun: shard parameters with FSDP instead of DDP
    tf32: bool = True  # CUDA: float32 matmuls in TensorFloat-32 (A100 and later; not on CPU)
    dist_timeout: float = 300.0  # seconds a collective may wait before the run is stopped

    def check(self) -> TrainConfig:
        """Reject values that are of the right type but make no sense."""
        choices = {
            "optimizer": ("adamw", "adam", "muon"),
            "muon_adjust_lr": ("original", "match_rms_adamw"),
            "decay": ("cosine", "linear", "constant"),
            "dtype": ("float32", "bfloat16", "float16"),
            "attn_impl": ("sdpa", "math"),
            "pos_embedding": POS_EMBEDDINGS,
            "data_format": DATA_FORMATS,
            "base_dtype": ("float32", "bfloat16"),
            "decode_errors": DECODE_ERRORS,
            "objective": ("lm", "dpo"),
            "dpo_loss": ("sigmoid", "ipo"),
            "task": ("lm", "classification"),
            "classifier_trainable": ("all", "last_block", "head"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise MiniGPT2Error(
                    f"{key}={getattr(self, key)!r}; use one of {', '.join(allowed)}"
                )
        positive = (
            "batch_size",
            "gradient_accumulation_steps",
            "block_size",
            "eval_iters",
            "eval_interval",
            "log_interval",
            "checkpoint_interval",
            "vocab_multiple",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise MiniGPT2Error(f"{key}={getattr(self, key)} must be at least 1")
        keys = (
            "max_iters",
            "warmup_iters",
            "lr_decay_iters",
            "n_layer",
            "n_head",
            "n_embd",
            "threads",
        )
        for key in (*keys, "hellaswag_examples", "num_labels"):
            if getattr(self, key) < 0:
                raise MiniGPT2Error(f"{key}={getattr(self, key)} must not be negative")
        if self.optimizer == "muon" and (self.fsdp or self.lora_r):
            raise MiniGPT2Error(
                "optimizer=muon needs whole weight matrices to orthogonalize: it runs without "
                "fsdp (FSDP shards them) and without LoRA (whose adapters train with AdamW)"
            )
        if self.lora_r < 0:
            raise MiniGPT2Error(f"lora_r={self.lora_r} must not be negative (0 turns LoRA off)")
        if self.lora_r:
            self.lora()  # checks alpha, dropout and targets
            if self.fsdp:
                raise MiniGPT2Error("lora_r with fsdp=true is not supported; LoRA runs with DDP")
            if self.init_from == "scratch":
                raise MiniGPT2Error(
                    "LoRA adapts a trained model: set init_from to a released model, a "
                    "directory or a checkpoint (or lora_r=0 to train from scratch)"
                )
        self._check_objective()
        if self.learning_rate <= 0:
            raise MiniGPT2Error(f"learning_rate={self.learning_rate} must be above 0")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise MiniGPT2Error(f"min_lr={self.min_lr} must be between 0 and learning_rate")
        return self

    def _check_objective(self) -> None:
        """Refuse objective and task settings that do not go together."""
        if self.objective == "dpo" and self.task == "classification":
            raise MiniGPT2Error(
                "objective=dpo trains a language model on preference pairs; a classifier "
                "(task=classification) trains with objective=lm"
            )
        if self.objective == "dpo" and self.data_format not in ("auto", "preference"):
            raise MiniGPT2Error(
                f"objective=dpo reads preference records; data_format={self.data_format!r} "
                "is not one (leave it auto, or set preference)"
            )
        special = self.objective == "dpo" or self.task == "classification"
        if special and self.fsdp:
            raise MiniGPT2Error("objective=dpo and task=classification run with DDP, not fsdp")
        if self.dpo_beta <= 0:
            raise MiniGPT2Error(f"dpo_beta={self.dpo_beta} must be above 0")
        if self.lora_r and self.task == "classification" and self.classifier_trainable != "all":
            raise MiniGPT2Error(
                f"classifier_trainable={self.classifier_trainable} with LoRA: LoRA already "
                "trains the adapters and the head alone; drop one of them"
            )
        if self.objective == "dpo" and self.init_from == "scratch" and not self.dpo_reference:
            raise MiniGPT2Error(
                "objective=dpo tunes a trained model: set init_from (its reference is the "
                "starting model unless dpo_reference names another)"
            )

    def lora(self):
        """The run's LoRAConfig (lora_r > 0), from the lora_* keys."""
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, targets)

    def to_toml(self, comments: bool = False) -> str:
        """The resolved config as TOML, to save beside the checkpoints; with comments, each key
        followed by what it does (the comment on its line above, for --help)."""
        notes = _field_comments() if comments else {}
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
            else:
                text = repr(value)
            line = f"{f.name} = {text}"
            lines.append(f"{line:<32} # {notes[f.name]}" if notes.get(f.name) else line)
        return "\n".join(lines) + "\n"


def _field_comments() -> dict[str, str]:
    """Each TrainConfig key's comment in this file: what the key does, written once."""

    try:
        source = inspect.getsource(TrainConfig)
    except OSError:  # no source shipped (a zipped install): keys and defaults alone
        return {}
    found = re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source, flags=re.MULTILINE)
    return dict(found)


_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


def _valid_keys() -> str:
    return ", ".join(_TYPES)


def _coerce(key: str, value, origin: str):
    """value as the field's type; ints are accepted where floats are expected."""
    want = _TYPE_NAMES[_TYPES[key]]
    if isinstance(value, str) and origin == "command line" and want is not str:
        text = value.strip().lower()
        try:
            if want is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return want(value)
        except ValueError:
            raise MiniGPT2Error(
                f"{origin}: {key}={value!r} is not a valid {want.__name__}"
            ) from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise MiniGPT2Error(
            f"{origin}: {key} must be {want.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _apply(values: dict, updates: dict, origin: str) -> None:
    for raw_key, value in updates.items():
        key = raw_key.replace("-", "_")
        if key not in _TYPES:
            raise MiniGPT2Error(f"{origin}: unknown key {raw_key!r}; valid keys: {_valid_keys()}")
        values[key] = _coerce(key, value, origin)


def parse_args(argv: list[str], default_file: str | None = None) -> TrainConfig:
    """Build a config from `[FILE.toml] [--key=value | --key value ...]`."""
    defaults, given = read_settings(argv, default_file)
    return TrainConfig(**{**defaults, **given}).check()


def from_settings(base: dict, settings: dict) -> TrainConfig:
    """A config from a saved one (base, e.g. a checkpoint's) with settings given now on top."""
    values: dict = {}
    _apply(values, {k: v for k, v in base.items() if k in _TYPES}, "saved config")
    return TrainConfig(**{**values, **settings}).check()


# What a checkpoint fixes: the model's shape and adapters. A resumed run trains the saved model,
# so a different value given at resume is refused rather than recorded for a model that is not.
FIXED_AT_RESUME = (
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "bias",
    "vocab_multiple",
    "pos_embedding",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "base_dtype",
    "objective",
    "task",
    "num_labels",
)


def resume_config(saved: dict, settings: dict, out_dir: str) -> TrainConfig:
    """The config of a resumed run: the saved one (a checkpoint's) with settings given now on
    top; a setting of FIXED_AT_RESUME that differs from the saved value is an error."""
    was = from_settings(saved, {})
    changed = [k for k in FIXED_AT_RESUME if k in settings and settings[k] != getattr(was, k)]
    if changed:
        given = ", ".join(f"{k}={settings[k]!r}" for k in changed)
        kept = ", ".join(f"{k}={getattr(was, k)!r}" for k in changed)
        raise MiniGPT2Error(
            f"{given} cannot change at resume: the checkpoint in {out_dir} has {kept}; drop "
            f"{'it' if len(changed) == 1 else 'them'}, or start a new run (another --out_dir, "
            "or --overwrite=true without --init_from=resume)"
        )
    return from_settings(saved, {**settings, "init_from": "resume"})


def read_settings(argv: list[str], default_file: str | None = None) -> tuple[dict, dict]:
    """(defaults, given): default_file's settings when argv names no config file, and the
    settings argv gives (its config file, then --key=value), each typed and checked. Kept
    apart so a resumed run can take the saved config under what was given, not the defaults."""
    files = [a for a in argv if not a.startswith("--") and a.endswith(".toml")]
    rest = [a for a in argv if a not in files]
    if len(files) > 1:
        raise MiniGPT2Error(f"give at most one config file, got {len(files)}: {files}")
    defaults: dict = {}
    if default_file and not files:
        _apply(defaults, load_toml(Path(default_file)), str(default_file))
    values: dict = {}
    if files:
        _apply(values, load_toml(Path(files[0])), files[0])
    overrides, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise MiniGPT2Error(
                f"unexpected argument {arg!r}; use --key=value (keys: {_valid_keys()})"
            )
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value, i = arg[2:], rest[i + 1], i + 1
        else:
            raise MiniGPT2Error(f"{arg} has no value; write {arg}=VALUE")
        overrides[key] = value
        i += 1
    _apply(values, overrides, "command line")
    return defaults, values


def load_toml(path: Path) -> dict:
    """A TOML file's top-level table, with a one-line error when it is missing or malformed."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MiniGPT2Error(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise MiniGPT2Error(f"{path}: not valid TOML ({e})") from None

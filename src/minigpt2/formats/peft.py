"""LoRA adapters in PEFT's file format: adapter_model.safetensors + adapter_config.json, which
`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), DIR)` loads; a classifier's
(task_type SEQ_CLS, its `score` head among modules_to_save) loads over
`GPT2ForSequenceClassification.from_pretrained(BASE, num_labels=K)`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import write_atomic


def peft_adapter(
    tensors: dict[str, torch.Tensor], saved: dict, classifier: bool = False
) -> tuple[dict, dict]:
    """(adapter_model.safetensors tensors, adapter_config.json) in PEFT's LoRA format; with
    classifier, the `score` head whole, as PEFT saves a module it trains in full."""
    out = {}
    for name, value in tensors.items():
        module, _, kind = name.removeprefix("model.").rpartition(".")  # kind: lora_A / lora_B
        key = f"{module}.{kind}.weight" if kind in ("lora_A", "lora_B") else f"{module}.{kind}"
        out[f"base_model.model.{key}"] = value.detach().float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": saved["base"],
        "r": saved["r"],
        "lora_alpha": saved["alpha"],
        "lora_dropout": saved["dropout"],
        "target_modules": list(saved["targets"]),
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers store weights (in, out)
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": ["score"] if classifier else None,
        "use_rslora": False,
        "use_dora": False,
    }
    return out, config


def save_peft_adapter(
    tensors: dict[str, torch.Tensor], saved: dict, out_dir, classifier: bool = False
) -> list[str]:
    """Write adapter_model.safetensors + adapter_config.json (PEFT's LoRA layout) into out_dir."""
    weights, config = peft_adapter(tensors, saved, classifier)
    out = Path(out_dir)
    write_atomic(
        out / "adapter_model.safetensors",
        lambda p: save_file(weights, p, metadata={"format": "pt"}),
    )
    text = json.dumps(config, indent=2) + "\n"
    write_atomic(out / "adapter_config.json", lambda p: Path(p).write_text(text))
    return ["adapter_model.safetensors", "adapter_config.json"]

"""Per-task LoRA adapters with peft: ``model.head = "lora"``.

``add_lora_adapter`` wraps the shared encoder with ``peft.get_peft_model`` (LoRA rank
``model.lora_r``, scaling ``model.lora_alpha``, on ``model.lora_targets`` or the encoder's
default: query/value for BERT-family encoders, ``lm_head`` for causal LMs, the bottleneck
for the character LSTM). One model instance serves every task: the adapter weights (names
containing ``lora_``) are private, like the head, and are swapped in per task by
:mod:`fedtask.task`; each client keeps its own in ``context.state``, and they never leave it.

peft freezes every base weight (it was made for adapter-only fine-tuning). Here the base
encoder is the *shared* representation the server trains with FedSGD, so the base weights
get back the ``requires_grad`` they had before wrapping (only frozen embeddings stay frozen).

The adversary's oracle calls ``TaskModel.embed``, which runs the encoder inside peft's
``disable_adapter()``: the server's encoder, with no task's adapter.
"""
from __future__ import annotations

from torch import nn

from fedtask.models import TaskModel


def lora_targets(encoder: nn.Module, config) -> list[str]:
    targets = list(config.model.lora_targets) or list(getattr(encoder, "lora_targets", ()))
    if not targets:
        raise ValueError(f"model.lora_targets: no default LoRA targets for model.encoder="
                         f"{config.model.encoder!r}; name the modules (e.g. [\"query\", \"value\"])")
    names = {name.rsplit(".", 1)[-1] for name, _ in encoder.named_modules()} | {n for n, _ in encoder.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"model.lora_targets: no module named {', '.join(map(repr, missing))} in "
                         f"model.encoder={config.model.encoder!r}")
    return targets


def add_lora_adapter(model: TaskModel, config) -> TaskModel:
    """Wrap ``model.encoder`` with one LoRA adapter; its weights are the task's private part."""
    from peft import LoraConfig, get_peft_model

    encoder = model.encoder
    trainable = {name: p.requires_grad for name, p in encoder.named_parameters()}
    lora_config = LoraConfig(r=config.model.lora_r, lora_alpha=config.model.lora_alpha,
                             target_modules=lora_targets(encoder, config), lora_dropout=0.0, bias="none")
    peft_encoder = get_peft_model(encoder, lora_config)
    for name, param in peft_encoder.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
        else:  # base weights stay shared and trainable, as they were before peft froze them
            original = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            param.requires_grad_(trainable.get(original, True))
    model.encoder = peft_encoder
    if getattr(encoder, "produces_logits", False):
        model.head = nn.Identity()  # the LM's own head (shared, plus the private adapter) gives the logits
    return model

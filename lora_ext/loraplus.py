"""LoRA+ (Hayou et al., 2024): lora_B learns loraplus_lr_ratio times faster than lora_A. The optimizer's
parameter groups are PEFT's create_loraplus_optimizer's, in its order, so a recipe moves over as it is."""
from __future__ import annotations

from torch import nn
from torch.optim import Optimizer


def _layer_norm_types() -> tuple:
    try:  # what PEFT (through transformers' Trainer) exempts from weight decay
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        return tuple(ALL_LAYERNORM_LAYERS)
    except ImportError:
        return (nn.LayerNorm,)


def _decayed_names(model: nn.Module) -> set:
    """Parameters outside layer norms and not biases: transformers' get_parameter_names, as PEFT uses it."""
    norms = _layer_norm_types()
    inside_norms = {f"{m_name}.{p_name}" if m_name else p_name
                    for m_name, m in model.named_modules() if isinstance(m, norms)
                    for p_name, _ in m.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters() if n not in inside_norms and "bias" not in n}


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type, lr: float, loraplus_lr_ratio: float,
                              **kwargs) -> Optimizer:
    """optimizer_cls over the trainable parameters in PEFT's four groups: lora_A and other matrices at lr;
    LoRA embeddings at loraplus_lr_embedding (1e-6; lora_ext has none); lora_B and vectors (biases, norms)
    at lr * loraplus_lr_ratio, decayed or not as transformers' Trainer would. loraplus_weight_decay (0.0)
    is the groups' weight decay; other keywords go to the optimizer."""
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0 (the paper suggests 2 to 16), got {loraplus_lr_ratio!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    decayed = _decayed_names(model)
    group_a, group_b, group_b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            (group_b if name in decayed else group_b_no_decay).append(p)
        else:
            group_a.append(p)
    if not group_a and not group_b and not group_b_no_decay:
        raise ValueError("create_loraplus_optimizer: the model has no trainable parameters")
    groups = [{"params": group_a, "weight_decay": weight_decay, "lr": lr},
              {"params": [], "weight_decay": weight_decay, "lr": embedding_lr},
              {"params": group_b, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
              {"params": group_b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio}]
    return optimizer_cls(groups, lr=lr, **kwargs)

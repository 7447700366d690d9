"""The optional peers (bitsandbytes, torchao, PEFT): imported where installed, each absence or failure
a note rather than a crash, and the builders that give a peer the same weights as ours."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .timing import measure


def _skipped(name: str, e: Exception, notes: list) -> None:
    note = f"{name} skipped: {type(e).__name__}: {e}"
    if note not in notes:  # a section asks once per case
        notes.append(note)


def bitsandbytes(notes: list):
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (bitsandbytes.functional.* is used through the package)

        return bitsandbytes
    except Exception as e:  # noqa: BLE001  (any import failure means: not available here)
        _skipped("bitsandbytes", e, notes)


def peft(notes: list):
    try:
        import peft

        return peft
    except Exception as e:  # noqa: BLE001
        _skipped("peft", e, notes)


def torchao_to_nf4(notes: list) -> Optional[Callable]:
    """torchao's to_nf4(tensor, block_size, scaler_block_size) -> NF4Tensor. Newer torchao exports it from
    torchao.quantization, older releases from torchao.dtypes.nf4tensor."""
    try:
        try:
            from torchao.quantization import to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import to_nf4
        return to_nf4
    except Exception as e:  # noqa: BLE001  (also a torchao built against another torch)
        _skipped("torchao", e, notes)


def copies(t: torch.Tensor, count: int) -> list:
    """count independent copies of a tensor subclass (torchao's NF4Tensor) through the traceable-subclass
    protocol: cheap where re-quantizing would take seconds on the CPU, and as far apart in memory."""
    names, ctx = t.__tensor_flatten__()
    return [t] + [type(t).__tensor_unflatten__({k: getattr(t, k).clone() for k in names}, ctx, t.size(), t.stride())
                  for _ in range(count - 1)]


def attempt(name: str, fn: Callable, notes: list):
    """fn() for one peer. Ours (lora_ext ...) and the frozen base must work: their failure is raised.
    Another package's peer may not work with this torch or device: its failure is None and a note."""
    if name.startswith("lora_ext") or name == "frozen base":
        return fn()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        notes.append(f"{name} failed, skipped: {type(e).__name__}: {e}")


def median_s(peer: str, fn: Callable, arg_sets: list, device, effort: dict, notes: list):
    """measure()'s median for one peer (None, with a note, for another package's peer that fails)."""
    t = attempt(peer, lambda: measure(fn, arg_sets, device, **effort), notes)
    return t and t.median_s


def bnb_linear4bit(bnb, dense: nn.Linear) -> nn.Module:
    """bitsandbytes' Linear4bit over dense's weight as transformers loads a QLoRA model: NF4, blocksize 64,
    double quant, compute in the weight's dtype (quantized by the .to())."""
    l4 = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                           compute_dtype=dense.weight.dtype, compress_statistics=True, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True)
    if dense.bias is not None:
        l4.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    return l4.to(dense.weight.device)


def to_bnb_4bit(bnb, model: nn.Module) -> nn.Module:
    """Every nn.Linear but the output head becomes a Linear4bit (what transformers' bitsandbytes loading
    does, and what quantize_base='nf4' does on our side)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m is not head:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, bnb_linear4bit(bnb, m))
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit with its bitsandbytes LoRA layer
    return model


def peft_lora(peft, model: nn.Module, targets: list, r: int) -> nn.Module:
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)

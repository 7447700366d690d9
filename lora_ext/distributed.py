"""LoRA and QLoRA models under PyTorch's own distributed engines.

DDP: wrap the LoraModel in DistributedDataParallel; only the adapters require grad, so only they are
reduced. FSDP2: `fully_shard_lora` shards each decoder block and the root with `fully_shard`. NF4
packed weights shard like any parameter (dim 0 of the packed bytes); their small scale buffers stay
whole on every rank. FSDP2's mixed precision casts only floating-point parameters, so uint8 storage
is never touched; packed bytes viewed as a float dtype (quant_storage) must not be cast, which
`check_mixed_precision` refuses up front (and NF4Linear refuses at run time). torch before 2.13 cannot
shard integer parameters at all: there the packed bytes are viewed as the policy's float dtype first.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.torch_version import TorchVersion

from .nf4 import NF4Linear


def rank() -> int:
    """This process's rank, 0 outside a process group."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter FSDP2 sharded (a collective: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


@torch.no_grad()
def copy_full_into(dest: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, which may be an FSDP2 shard (every rank holds `full`)."""
    if _is_dtensor(dest):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(device=dest.device, dtype=dest.dtype), dest.device_mesh, dest.placements,
                                 src_data_rank=None)  # every rank has the same tensor: no broadcast
    dest.copy_(full)


def decoder_blocks(model: nn.Module) -> list:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes), outermost first."""
    hf = getattr(getattr(model, "base_model", None), "model", model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    blocks = [m for m in hf.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(hf).__name__} names no decoder block class (_no_split_modules); pass blocks=[...] "
                         f"to fully_shard_lora")
    return blocks


def check_mixed_precision(model: nn.Module, mp_policy) -> None:
    """Refuse a policy that would cast NF4 packed bytes stored in a floating dtype."""
    param_dtype = getattr(mp_policy, "param_dtype", None)
    if param_dtype is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear) and m.quant_storage.is_floating_point and m.quant_storage != param_dtype:
            raise ValueError(f"{name}: NF4 packed weights are stored as {m.quant_storage}, and the mixed-precision "
                             f"policy would cast them to {param_dtype}, corrupting the 4-bit data. Use "
                             f"quant_storage=torch.uint8 (FSDP2 leaves integer parameters alone) or "
                             f"param_dtype={m.quant_storage}.")


def fsdp2_holds_integer_parameters() -> bool:
    """Whether this torch's fully_shard can hold a uint8 parameter. Before 2.13 it builds each sharded
    parameter as nn.Parameter(t) (requires_grad=True) and only then copies requires_grad over, which an
    integer tensor refuses ("only Tensors of floating point dtype can require gradients")."""
    return TorchVersion(torch.__version__) >= (2, 13)


def view_packed_weights_for_fsdp2(model: nn.Module, mp_policy=None) -> int:
    """Where FSDP2 cannot hold integer parameters, view each NF4Linear's uint8 packed bytes as a float
    dtype, bitsandbytes' quant_storage answer for FSDP: the mixed-precision policy's param_dtype (so it
    casts nothing), else bfloat16. The bytes are not copied or changed. Every layer is checked before any
    changes; the count of layers re-viewed is returned."""
    if fsdp2_holds_integer_parameters():
        return 0
    param_dtype = getattr(mp_policy, "param_dtype", None)
    storage = param_dtype if param_dtype is not None and param_dtype.is_floating_point else torch.bfloat16
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, NF4Linear) and not m.quant_storage.is_floating_point]
    size = torch.empty((), dtype=storage).element_size()
    for name, m in layers:
        if m.weight.numel() % size:
            raise ValueError(
                f"{name}: torch {torch.__version__}'s FSDP2 cannot shard integer parameters (torch 2.13 and newer "
                f"can), so lora_ext views NF4 packed bytes as {storage}; this layer's {m.weight.numel()} bytes are "
                f"not a whole number of {storage} ({size} bytes each). Use torch>=2.13, or quantize it with a "
                f"quant_storage whose size divides its packed bytes.")
    for _, m in layers:
        m._set_weight(m.qweight.with_storage(storage))
    return len(layers)


def fully_shard_lora(model: nn.Module, mesh=None, mp_policy=None, blocks: Optional[list] = None,
                     reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over a LoRA/QLoRA model: each decoder block, then the root. Build the optimizer after this
    (it must see the sharded parameters). On torch < 2.13, NF4 packed bytes are viewed as a float dtype
    first (view_packed_weights_for_fsdp2)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_mixed_precision(model, mp_policy)
    view_packed_weights_for_fsdp2(model, mp_policy)
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(),
                  reshard_after_forward=reshard_after_forward)
    for block in blocks if blocks is not None else decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def rank_bytes(model: nn.Module) -> dict:
    """Bytes this rank holds, against the whole model: frozen base parameters, trainable adapters, and
    buffers (NF4 scales; never sharded)."""
    out = {"base_local": 0, "base_total": 0, "adapter_local": 0, "adapter_total": 0, "buffers": 0}
    for p in model.parameters():
        kind = "adapter" if p.requires_grad else "base"
        out[f"{kind}_local"] += _local(p).numel() * p.element_size()
        out[f"{kind}_total"] += p.numel() * p.element_size()
    out["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())
    return out

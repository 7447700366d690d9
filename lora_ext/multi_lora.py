"""Many adapters in one batch, as one operator per layer: `multi_lora_linear` (the functional form) and
the plan it runs on (`plan`).

Each row of a batch names an adapter (an index into the adapter lists, -1 for none). `plan` orders the
rows by adapter and cuts each adapter's run into tiles of at most 64 rows: a prompt's many tokens
(prefill) become full tiles, the segments of Punica's SGMV; a single token per sequence (decode) becomes
tiles of one row, BGMV's gather. The plan depends only on the rows' adapters, so a model builds it once
per batch and every layer reuses it. `torch.ops.lora_ext.multi_lora_forward_` then adds each row's update
to the base output in place: the shrink T = x A^T and the expand y += s T B^T, each one launch over all
adapters on CUDA; fp32 accumulation and one rounding of y.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import ops

TILE_ROWS = 64  # csrc/multi/multi_launch.h kTileRows: the kernels' rows per tile


@dataclass(frozen=True)
class MultiLoraPlan:
    rows: torch.Tensor   # int64: the rows that have an adapter, grouped by adapter (stable: in batch order)
    tiles: torch.Tensor  # int32 (n, 3): adapter, first position in rows, count (<= TILE_ROWS)
    n_adapters: int

    def to(self, device) -> "MultiLoraPlan":
        return MultiLoraPlan(self.rows.to(device), self.tiles.to(device), self.n_adapters)


def _as_indices(adapter_indices) -> torch.Tensor:
    """adapter_indices as a 1-D tensor; an empty sequence (a batch without rows) is int64, not the float32
    that torch.as_tensor([]) makes."""
    idx = torch.as_tensor(adapter_indices)
    if idx.numel() == 0 and not isinstance(adapter_indices, torch.Tensor):
        idx = idx.to(torch.int64)
    return idx.reshape(-1)


def plan(adapter_indices, n_adapters: int, device=None) -> MultiLoraPlan:
    """The plan for rows whose adapters are `adapter_indices` (one per row, -1 for the base alone), on
    `device`. Built on the CPU: indices given on a GPU are copied over first (one sync)."""
    idx = _as_indices(adapter_indices).cpu()
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"adapter_indices must be integers (an adapter's index, -1 for none), got {idx.dtype}")
    idx = idx.to(torch.int64)
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= n_adapters):
        raise ValueError(f"adapter_indices must be in [-1, {n_adapters}) for {n_adapters} adapters, got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    rows = torch.nonzero(idx >= 0).flatten()
    rows = rows[torch.argsort(idx[rows], stable=True)]
    counts = torch.bincount(idx[rows], minlength=n_adapters).tolist()
    tiles, start = [], 0
    for adapter, count in enumerate(counts):
        for first in range(start, start + count, TILE_ROWS):
            tiles.append((adapter, first, min(TILE_ROWS, start + count - first)))
        start += count
    tiles_t = torch.tensor(tiles, dtype=torch.int32).reshape(-1, 3)
    return MultiLoraPlan(rows, tiles_t, n_adapters).to(device if device is not None else "cpu")


def _scales(scaling, n: int) -> list:
    if isinstance(scaling, (int, float)):
        return [float(scaling)] * n
    scales = [float(s) for s in scaling]
    if len(scales) != n:
        raise ValueError(f"scaling must be one number or one per adapter ({n}), got {len(scales)}")
    return scales


def _base_output(x: torch.Tensor, base, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from .nf4 import NF4Weight, nf4_linear

    if isinstance(base, NF4Weight):
        return nf4_linear(x, base, bias)
    if isinstance(base, torch.Tensor):
        # (torch's linear takes a meta weight beside a CPU input, and returns uninitialized CPU memory)
        ops._check_one_device("multi_lora_linear", x, base, bias)
        # As the lora_linear op: torch's linear gives a bias of another shape its broadcast message, and takes
        # a non-float one for 3-D inputs (matmul + add) but refuses it for 2-D ones (addmm).
        if bias is not None and base.dim() == 2 and not (bias.is_floating_point() and bias.shape == base.shape[:1]):
            raise RuntimeError(f"multi_lora_linear: bias must be floating point of shape ({base.shape[0]},), got "
                               f"{bias.dtype} of shape {tuple(bias.shape)}")
        return nn.functional.linear(x, base, bias)
    if callable(base):
        if bias is not None:
            raise ValueError("multi_lora_linear: bias goes with a weight; a module adds its own")
        return base(x)
    raise TypeError(f"multi_lora_linear: base must be a weight (Tensor or NF4Weight) or a module, got "
                    f"{type(base).__name__}")


def check_inference(*tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("multi_lora_linear computes no gradient (mixed-adapter batches are for inference, as "
                           "in PEFT); call it under torch.no_grad() or torch.inference_mode()")


def add_adapters_(y: torch.Tensor, x: torch.Tensor, lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
                  scales: Sequence[float], the_plan: MultiLoraPlan) -> torch.Tensor:
    """y (the base output, contiguous) += each planned row's adapter update, in place."""
    if the_plan.n_adapters != len(lora_A):
        raise ValueError(f"the plan was made for {the_plan.n_adapters} adapters, got {len(lora_A)}")
    return ops.multi_lora_forward_(y, x, lora_A, lora_B, scales, the_plan.rows, the_plan.tiles)


def multi_lora_linear(x: torch.Tensor, base: Union[torch.Tensor, nn.Module], lora_A: Sequence[torch.Tensor],
                      lora_B: Sequence[torch.Tensor], scaling: Union[float, Sequence[float]],
                      adapter_indices: Union[torch.Tensor, Sequence[int], MultiLoraPlan],
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = base(x) + on each row i with adapter a = adapter_indices[i]: scaling[a] * x_i A[a]^T B[a]^T.

    base: a weight (out_features x in_features; an NF4Weight for a 4-bit base) with an optional bias, or a
    module (nn.Linear, NF4Linear, Conv1D). lora_A[a] is (r_a, in_features), lora_B[a] (out_features, r_a):
    every adapter its own rank; r_a = 0 leaves its rows to the base. adapter_indices: one per row of x
    (its leading dims flattened), -1 for the base alone; or a plan from `plan(...)` (build it once per
    batch and reuse it in every layer). Inference only: no gradient.
    """
    if len(lora_A) != len(lora_B):
        raise ValueError(f"lora_A and lora_B must have one entry per adapter, got {len(lora_A)} and {len(lora_B)}")
    check_inference(x, *lora_A, *lora_B)
    the_plan = adapter_indices if isinstance(adapter_indices, MultiLoraPlan) else None
    if the_plan is None:
        n_rows = x.shape[:-1].numel() if x.dim() else 1
        idx = _as_indices(adapter_indices)
        if idx.numel() != n_rows:
            raise ValueError(f"adapter_indices must have one entry per row of x ({n_rows}), got {idx.numel()}")
        the_plan = plan(idx, len(lora_A), x.device)
    y = _base_output(x, base, bias).contiguous()
    return add_adapters_(y, x, lora_A, lora_B, _scales(scaling, len(lora_A)), the_plan)

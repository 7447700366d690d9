"""The least each benchmarked operation must do, in bytes moved and FLOPs: what the ceilings apply to.
Counted from the format (NF4 or dense) and the shapes, never from how an implementation goes about it."""
from __future__ import annotations

import torch
from torch import nn


def nf4_bytes(n: int) -> int:
    """Packed codes + absmax as benchmarked: blocksize 64, double quant (one uint8 per block)."""
    return (n + 1) // 2 + -(-n // 64)


def dequant_bytes(n: int, out_dtype: torch.dtype) -> int:
    return nf4_bytes(n) + n * out_dtype.itemsize


def weight_bytes(n: int, dtype: torch.dtype, four_bit: bool) -> int:
    return nf4_bytes(n) if four_bit else n * dtype.itemsize


def lora_fwd_bwd(M: int, K: int, N: int, r: int | None, dtype: torch.dtype, four_bit: bool) -> tuple:
    """(bytes, FLOPs) of y = x W^T (+ LoRA) and its backward with W frozen: W read twice (forward,
    dx = dy W), x and y written and read once each way; 4MKN for the base, 6Mr(K+N) for x A^T B^T,
    dA, dB and the adapter's share of dx."""
    nbytes = 2 * weight_bytes(K * N, dtype, four_bit) + 2 * M * (K + N) * dtype.itemsize
    flops = 4 * M * K * N + (6 * M * r * (K + N) if r else 0)
    return nbytes, flops


def lora_decode(K: int, N: int, r: int | None, dtype: torch.dtype, four_bit: bool) -> tuple:
    """(bytes, FLOPs) of one token's y = x W^T (+ LoRA) with grad off: W read once, 2KN + 2r(K+N)."""
    return weight_bytes(K * N, dtype, four_bit) + (K + N) * dtype.itemsize, 2 * K * N + (2 * r * (K + N) if r else 0)


def train_flops_per_token(model: nn.Module, targets: list, r: int, seq: int) -> int:
    """A LoRA training step per token: 4 FLOPs per frozen weight (forward, dx), 6 per adapter weight
    (forward, dx, dW), and attention at 12 * layers * hidden * seq (counted over the full S x S, as
    PaLM's MFU does)."""
    frozen = adapters = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            frozen += m.in_features * m.out_features
            if any(name.endswith("." + t) for t in targets):
                adapters += r * (m.in_features + m.out_features)
    cfg = model.config
    return 4 * frozen + 6 * adapters + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq

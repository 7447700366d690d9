"""The oracle for dequantized NF4 values: the format's definition, computed here from bitsandbytes'
own packed bytes and QuantState. bitsandbytes is the oracle for packed bytes, absmax and the nested
state, but not for dequantized values on the CPU: its AVX-512 dequant is wrong when a row's length is
not a multiple of the blocksize (DESIGN.md), so a test that used it would pass or fail by the CPU."""
import math

import torch


def dequantize_by_definition(packed: torch.Tensor, state, dtype: torch.dtype = None) -> torch.Tensor:
    """code[nibble] * absmax in fp32, rounded once to `dtype` (state.dtype by default), where a
    double-quantized absmax is nested_code[q] * nested_absmax + offset (two fp32 roundings, as
    bitsandbytes decodes it). Element 2j is the high nibble of byte j."""
    n = math.prod(state.shape)
    raw = packed.detach().reshape(-1).view(torch.uint8).cpu()
    nibbles = torch.stack([raw >> 4, raw & 15], dim=1).reshape(-1)[:n].long()
    absmax = state.absmax.detach().cpu()
    if state.nested:
        nested = state.state2
        blocks = torch.arange(absmax.numel()) // nested.blocksize
        absmax = nested.code.cpu()[absmax.long()] * nested.absmax.cpu()[blocks]
        absmax = absmax + state.offset.cpu()
    scale = absmax.float()[torch.arange(n) // state.blocksize]
    values = state.code.cpu().float()[nibbles] * scale
    return values.to(dtype or state.dtype).reshape(state.shape)

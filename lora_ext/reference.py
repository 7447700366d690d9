"""Pure-PyTorch versions of every lora_ext operator: the test oracle and the benchmark baseline.

The NF4 functions reproduce bitsandbytes' CPU backend bit for bit (the rules are spelled out in
csrc/nf4/nf4_common.h); they are slow and allocate freely, and they work without lora_ext._C.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)
NF4_PAD_CODE = 7  # code of 0.0: the low nibble of an odd element count's last byte
NESTED_BLOCKSIZE = 256
DYN_GRID = 65536


def nf4_midpoints() -> torch.Tensor:
    return (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic quantization map bitsandbytes double-quantizes absmax with (sorted, 256)."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def quantize_nf4(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 ((n+1)//2, 1), absmax float32 (ceil(n/blocksize),))."""
    x = A.reshape(-1).float()
    n = x.numel()
    rem = n % blocksize
    full = n - rem
    blk = x[:full].reshape(-1, blocksize)
    absmax = blk.abs().max(dim=-1)[0] if full else x.new_empty(0)
    scaled = (blk * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).reshape(-1)
    if rem:
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, x[full:] / tail_max])
    codes = torch.bucketize(scaled, nf4_midpoints().to(x.device)).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_PAD_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def _dyn_grid_codes(code: torch.Tensor) -> torch.Tensor:
    """Code index of each of the 65536 grid points over [-1, 1] (nearest, ties to the lower)."""
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(DYN_GRID, dtype=torch.float32)) / float(DYN_GRID - 1)
    return torch.searchsorted(mids, grid)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU quantize_blockwise: -> (uint8 codes, float32 absmax per block)."""
    x = x.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    # NaN is skipped by the max; +Inf stays Inf (nan_to_num alone would clamp it to the largest float)
    absmax = torch.nan_to_num(padded.abs(), nan=0.0, posinf=math.inf).max(dim=-1)[0] if n else x.new_empty(0)
    inv = (1.0 / absmax).view(-1, 1)
    v = padded * inv
    v = torch.where(v >= -1.0, v, torch.full_like(v, -1.0)).clamp(max=1.0)  # NaN -> -1
    t = (((v + 1.0) * 0.5) * float(DYN_GRID - 1)) + 0.5
    q = _dyn_grid_codes(code.float().cpu()).to(x.device)[t.long()]
    q = torch.where(absmax.view(-1, 1) == 0, torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def double_quant(absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """-> (qabsmax uint8, nested_absmax float32, offset 0-dim float32)."""
    absmax = absmax.reshape(-1).float().contiguous()  # torch's mean rounds by memory order: the kernels' order
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    q, nested = quantize_blockwise_8bit(absmax - offset, code, blocksize)
    return q, nested, offset


def decode_absmax(qabsmax, nested_absmax, code, offset, nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    # flat, as the kernels read them (they check element counts only: a 0-dim nested_absmax is one block's)
    qabsmax, nested_absmax, code = qabsmax.reshape(-1), nested_absmax.reshape(-1), code.reshape(-1)
    idx = torch.arange(qabsmax.numel(), device=qabsmax.device) // nested_blocksize
    return code.to(qabsmax.device)[qabsmax.long()] * nested_absmax[idx] + offset.reshape(())


def unpack_nf4_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n].long()


def dequantize_nf4(packed, absmax, blocksize: int, shape: Sequence[int], dtype: torch.dtype,
                   nested_absmax: Optional[torch.Tensor] = None, nested_code: Optional[torch.Tensor] = None,
                   offset: Optional[torch.Tensor] = None, nested_blocksize: int = NESTED_BLOCKSIZE,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * absmax in `compute_dtype` (float32 as bitsandbytes; float64 for an exact oracle), cast to dtype."""
    n = math.prod(shape)
    if nested_absmax is not None:
        absmax = decode_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    values = NF4_CODE.to(packed.device, compute_dtype)[unpack_nf4_codes(packed, n)]
    scale = absmax.reshape(-1).to(compute_dtype)[torch.arange(n, device=packed.device) // blocksize]
    return (values * scale).to(dtype).reshape(shape)


def dequantize_nf4_out(packed, absmax, blocksize: int, out: torch.Tensor, nested_absmax=None, nested_code=None,
                       offset=None, nested_blocksize: int = NESTED_BLOCKSIZE) -> None:
    out.copy_(dequantize_nf4(packed, absmax, blocksize, out.shape, out.dtype, nested_absmax, nested_code, offset,
                             nested_blocksize))


def nf4_linear(x, packed, absmax, out_features: int, blocksize: int, bias=None, nested_absmax=None, nested_code=None,
               offset=None, nested_blocksize: int = NESTED_BLOCKSIZE, gemv_max_m: int = -1,
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ dequant(W).T (+ bias), W dequantized and the product taken in compute_dtype (fp64: an exact oracle)."""
    w = dequantize_nf4(packed, absmax, blocksize, (out_features, x.shape[-1]), compute_dtype, nested_absmax,
                       nested_code, offset, nested_blocksize, compute_dtype=compute_dtype)
    y = x.to(compute_dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def nf4_linear_grad_input(grad_out, packed, absmax, in_features: int, blocksize: int, nested_absmax=None,
                          nested_code=None, offset=None, nested_blocksize: int = NESTED_BLOCKSIZE,
                          compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = dequantize_nf4(packed, absmax, blocksize, (grad_out.shape[-1], in_features), compute_dtype, nested_absmax,
                       nested_code, offset, nested_blocksize, compute_dtype=compute_dtype)
    return (grad_out.to(compute_dtype) @ w).to(grad_out.dtype)


# ---------------------------------------------------------------- LoRA

_M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit halves of a * b for a (int64 holding uint32) and a uint32 constant b."""
    p_lo, p_hi = a * (b & 0xFFFF), a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox4x32_10(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 of each counter (int64) with a 64-bit key: (n, 4) uint32 values held in int64."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return torch.stack([c0, c1, c2, c3], dim=1)


def dropout_keep_mask(n: int, p: float, seed: int, device=None) -> torch.Tensor:
    """Which of n elements lora_dropout keeps (element e uses draw e % 4 of Philox block e // 4)."""
    draws = philox4x32_10(torch.arange((n + 3) // 4, device=device, dtype=torch.int64), seed).reshape(-1)[:n]
    return draws < math.floor((1.0 - p) * 2**32 + 0.5)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    keep = dropout_keep_mask(x.numel(), p, seed, x.device).view(x.shape)
    scale = float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))  # the kernels' fp32 factor
    if x.dtype == torch.float64:
        return torch.where(keep, x * scale, 0.0)
    return torch.where(keep, x.float() * torch.tensor(scale, dtype=torch.float32), 0.0).to(x.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a matrix over its last dimension (reshape(-1, K) is ambiguous when K is 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def lora_forward(x, base_out, A, B, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """(y, T): T = dropout(x) A^T in the adapters' dtype, y = base_out + scale T B^T."""
    xd = lora_dropout(x, dropout_p, seed) if dropout_p > 0 else x
    T = _rows(xd).to(A.dtype) @ A.t()
    delta = (T @ B.t()) * scale
    y = base_out + delta.reshape(base_out.shape).to(base_out.dtype)
    return y, T


def lora_backward(grad_y, x, T, A, B, scale: float, dropout_p: float = 0.0, seed: int = 0, grad_x_base=None):
    """(dx, dA, dB) of lora_forward's LoRA branch; dx includes grad_x_base (the base's dx) when given."""
    dy = grad_y.reshape(math.prod(x.shape[:-1]), B.shape[0]).to(A.dtype)  # the kernels' view of it
    dT = (dy @ B) * scale
    dB = (dy.t() @ T.to(A.dtype)) * scale
    xd = lora_dropout(x, dropout_p, seed) if dropout_p > 0 else x
    dA = dT.t() @ _rows(xd).to(A.dtype)
    dx = dT @ A
    if dropout_p > 0:
        dx = lora_dropout(dx, dropout_p, seed)
    if grad_x_base is not None:
        dx = dx + grad_x_base.reshape(dx.shape).to(dx.dtype)
    return dx.to(x.dtype).reshape(x.shape), dA, dB


def lora_linear(x, weight, bias, A, B, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """(y, T) of the whole layer over a dense base: x W^T (+ bias), then lora_forward."""
    return lora_forward(x, torch.nn.functional.linear(x, weight, bias), A, B, scale, dropout_p, seed)


def lora_nf4_linear(x, packed, absmax, out_features: int, blocksize: int, bias, nested_absmax, nested_code, offset,
                    nested_blocksize: int, A, B, scale: float, dropout_p: float = 0.0, seed: int = 0):
    """(y, T) of the whole layer over an NF4 base: nf4_linear, then lora_forward."""
    base = nf4_linear(x, packed, absmax, out_features, blocksize, bias, nested_absmax, nested_code, offset,
                      nested_blocksize)
    return lora_forward(x, base, A, B, scale, dropout_p, seed)


def dora_forward(x, base_out, A, B, g, bias, scale: float):
    """(y, T): DoRA's y = g * (base_out + scale T B^T) + bias (base_out = x W^T, no bias), T = x A^T."""
    T = _rows(x).to(A.dtype) @ A.t()
    z = base_out.reshape(T.shape[0], B.shape[0]).to(A.dtype) + (T @ B.t()) * scale
    y = z * g.to(z.dtype) + (0 if bias is None else bias.to(z.dtype))
    return y.to(base_out.dtype).reshape(base_out.shape), T


def dora_backward(grad_y, x, base_out, T, A, B, g, scale: float, grad_x_base=None):
    """(dx, dA, dB, dg) of dora_forward, associated as the kernels do (so NaN and Inf land where theirs do):
    lora_backward on g * B gives dx, dA and dB / g; dB = g * (dB / g); dg_j = sum_i dy_ij base_ij +
    sum_k (dB / g)_jk B_jk, which is sum_i dy_ij (base + s T B^T)_ij. (The tests also check these against
    autograd through dora_forward.)"""
    gB = B * g.to(B.dtype)[:, None]
    dx, dA, dB_over_g = lora_backward(grad_y, x, T, A, gB, scale, grad_x_base=grad_x_base)
    n = B.shape[0]
    m = math.prod(x.shape[:-1])
    dg = (grad_y.reshape(m, n).to(A.dtype) * base_out.reshape(m, n).to(A.dtype)).sum(0) + (dB_over_g * B).sum(1)
    return dx, dA, dB_over_g * g.to(B.dtype)[:, None], dg.to(g.dtype)


def dora_a_times_w_t(A, weight):
    """A W^T in fp32 (fp64 if either is fp64): DoRA's norm term, from the whole weight converted at once."""
    wide = torch.float64 in (A.dtype, weight.dtype)
    return (A.double() @ weight.double().t()).to(torch.float64 if wide else torch.float32)


def dora_weight_norm(A, B, weight, w_sq, scale: float):
    """||W + s B A|| per row in fp32 from the whole out x in matrix in fp64 (what the op avoids); w_sq (||W_i||^2,
    which the op takes from its caller's cache) is not needed here."""
    return (weight.double() + scale * B.double() @ A.double()).norm(dim=1).float()


def dora_weight_norm_from_a_w_t(A, B, a_w_t, w_sq, scale: float):
    """The same from A W^T and ||W_i||^2, in fp64: w_sq + 2s B_i (A W^T)_:,i + s^2 B_i (A A^T) B_i^T."""
    B64, A64 = B.double(), A.double()
    cross = 2 * scale * (B64 * a_w_t.double().t()).sum(1)
    sq = w_sq.double() + cross + scale ** 2 * ((B64 @ (A64 @ A64.t())) * B64).sum(1)
    return sq.clamp_min(0).sqrt().float()


def dora_scaled_grad(grad_y, g):
    """g * dy, the product in fp32 (fp64 if either is fp64), rounded once to dy's dtype."""
    wide = torch.float64 in (grad_y.dtype, g.dtype)
    t = torch.float64 if wide else torch.float32
    return (grad_y.to(t) * g.to(t)).to(grad_y.dtype)


def dora_linear(x, weight, bias, A, B, g, scale: float):
    """(y, T, base_out) of the DoRA layer over a dense base: base_out = x W^T, then dora_forward."""
    base = torch.nn.functional.linear(x, weight)
    return (*dora_forward(x, base, A, B, g, bias, scale), base)


def dora_nf4_linear(x, packed, absmax, out_features: int, blocksize: int, bias, nested_absmax, nested_code, offset,
                    nested_blocksize: int, A, B, g, scale: float):
    """(y, T, base_out) of the DoRA layer over an NF4 base: nf4_linear without the bias, then dora_forward."""
    base = nf4_linear(x, packed, absmax, out_features, blocksize, None, nested_absmax, nested_code, offset,
                      nested_blocksize)
    return (*dora_forward(x, base, A, B, g, bias, scale), base)


def multi_lora_forward(y, x, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float],
                       adapter_indices) -> torch.Tensor:
    """A new y: each row i of x with adapter a = adapter_indices[i] (-1: none) gets y_i + scales[a] x_i A[a]^T B[a]^T,
    in fp64, rounded once to y's dtype."""
    idx = torch.as_tensor(adapter_indices, dtype=torch.int64).reshape(-1)
    x2, y2 = _rows(x).double(), _rows(y).double().clone()
    for a in range(len(A)):
        rows = torch.nonzero(idx == a).flatten().to(y.device)
        if rows.numel() and A[a].shape[0]:
            y2[rows] += (x2[rows] @ A[a].double().t() @ B[a].double().t()) * float(scales[a])
    return y2.to(y.dtype).reshape(y.shape)


def multi_lora_forward_(y, x, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], scales: Sequence[float], rows,
                        tiles) -> None:
    """The operator's form, in place: the rows each tile (adapter, first position, count) lists get its adapter."""
    idx = torch.full((math.prod(x.shape[:-1]),), -1, dtype=torch.int64)
    for adapter, start, count in tiles.tolist():
        idx[rows[start:start + count].cpu()] = adapter
    y.copy_(multi_lora_forward(y, x, A, B, scales, idx))


# ---------------------------------------------------------------- merge


def _merge_reference(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, sign: float) -> torch.Tensor:
    """fp64 delta summed over the rank in order (each product and sum rounded), one rounding of W."""
    A64, B64 = A.double(), B.double()
    acc = torch.zeros(W.shape, dtype=torch.float64, device=W.device)
    for j in range(A.shape[0]):
        acc = acc + B64[:, j:j + 1] * A64[j:j + 1, :]
    return (W.double() + (sign * scale) * acc).float().to(W.dtype)


def merge_lora_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    W.copy_(_merge_reference(W, A, B, scale, 1.0))


def unmerge_lora_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
    W.copy_(_merge_reference(W, A, B, scale, -1.0))


def merge_nf4(packed, absmax, blocksize: int, shape, A, B, scale: float, nested_absmax=None, nested_code=None,
              offset=None, nested_blocksize: int = NESTED_BLOCKSIZE):
    """(packed, fp32 absmax) of quantize(dequantize(W) + scale * B A) with merge_lora_'s arithmetic."""
    w = dequantize_nf4(packed, absmax, blocksize, shape, torch.float32, nested_absmax, nested_code, offset,
                       nested_blocksize)
    merge_lora_(w, A, B, scale)
    return quantize_nf4(w, blocksize)

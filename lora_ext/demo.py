"""A short end-to-end run of what lora_ext does today: quantize a Linear to NF4 as bitsandbytes would,
check it bit for bit against bitsandbytes when installed, and run the 4-bit layer."""
from __future__ import annotations

import time

import torch
from torch import nn

import lora_ext


def main(device: str = "cpu", in_features: int = 4096, out_features: int = 4096) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16
    linear = nn.Linear(in_features, out_features, bias=True).to(device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=0.02)  # LLM-like weights, the distribution NF4 is built for
    t0 = time.perf_counter()
    layer = lora_ext.NF4Linear.from_linear(linear, blocksize=64, double_quant=True)
    quant_s = time.perf_counter() - t0
    dense_bytes = linear.weight.numel() * linear.weight.element_size()
    nf4_bytes = layer.qweight.nbytes
    x = torch.randn(8, in_features, device=device, dtype=dtype)
    y_dense, y_nf4 = linear(x), layer(x)
    rel = ((y_nf4.float() - y_dense.float()).norm() / y_dense.float().norm()).item()
    summary = {"device": device, "shape": [out_features, in_features], "quantize_s": quant_s,
               "dense_MB": dense_bytes / 2**20, "nf4_MB": nf4_bytes / 2**20, "output_rel_error": rel,
               "bit_exact_with_bitsandbytes": None}
    print(f"lora_ext {lora_ext.__version__}: compiled kernels {'loaded' if lora_ext.HAS_C else 'MISSING'}"
          f" (build: {getattr(lora_ext.build_config(), 'WITH_CUDA', None) and 'CPU+CUDA' or 'CPU'})")
    print(f"NF4Linear {out_features}x{in_features} on {device}: quantized in {quant_s * 1e3:.1f} ms, "
          f"{dense_bytes / 2**20:.1f} MiB bf16 -> {nf4_bytes / 2**20:.1f} MiB NF4 "
          f"({dense_bytes / nf4_bytes:.2f}x smaller)")
    print(f"forward of 8 tokens: relative error vs the bf16 layer {rel:.4f} (4-bit quantization error)")
    try:
        import bitsandbytes.functional as BF
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes not available ({type(e).__name__}); skipped the bit-exactness check")
        return summary
    w = linear.weight.detach()
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    qw = layer.qweight
    same = (torch.equal(packed, qw.data) and torch.equal(state.absmax, qw.absmax)
            and torch.equal(state.state2.absmax, qw.nested_absmax)
            and torch.equal(BF.dequantize_4bit(packed, state), layer.dequantize()))
    summary["bit_exact_with_bitsandbytes"] = same
    print(f"bitsandbytes {__import__('bitsandbytes').__version__}: packed bytes, absmax, nested absmax and "
          f"dequantized weight {'identical' if same else 'DIFFERENT'}")
    sd = layer.state_dict()
    print(f"state dict keys (bitsandbytes Linear4bit layout): {', '.join(sd)}")
    return summary


if __name__ == "__main__":
    main()

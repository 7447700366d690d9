"""A training step (forward, backward, AdamW) of a small Llama built from a transformers.LlamaConfig
(nothing downloaded), LoRA on every projection: ours (LoRA, QLoRA via quantize_base="nf4") against
PEFT (dense, and over bitsandbytes Linear4bit as transformers loads a 4-bit model): tokens/s, the
fraction of the matmul ceiling (MFU), the GPU's peak memory, and the tensors each peer holds."""
from __future__ import annotations

import torch

from ..nf4 import dtype_name
from . import adapters, machine, peers, work
from .timing import EFFORT

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 16
# Llama config, (batch, sequence length). GPU: full has Llama-3-8B's layer shapes, quick TinyLlama-1.1B's; 4 layers.
CONFIGS = {
    ("cuda", "full"): (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32000), (4, 1024)),
    ("cuda", "quick"): (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=32000), (4, 512)),
    ("cpu", "full"): (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=4096), (4, 256)),
    ("cpu", "quick"): (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=2048), (4, 128)),
}
TINY = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=64), (2, 8))


def _llama(cfg: dict, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(**cfg, max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place: no host copy of the GPU model
        return transformers.LlamaForCausalLM(config).to(dtype).train()


def make_step(model) -> tuple:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, [model, opt]


def setup(device: torch.device, scale: str, notes: list):
    """(config, batch, seq, dtype, the frozen dense model, token batches to rotate), or None without
    transformers (a note says so)."""
    cfg, (batch, seq) = TINY if scale == "tiny" else CONFIGS[device.type, scale]
    dtype = machine.activation_dtype(device)
    dense = peers.attempt("transformers Llama", lambda: _llama(cfg, device, dtype).requires_grad_(False), notes)
    if dense is None:
        return None
    gen = torch.Generator().manual_seed(1)
    sets = [(torch.randint(0, cfg["vocab_size"], (batch, seq), generator=gen).to(device),) for _ in range(4)]
    return cfg, batch, seq, dtype, dense, sets


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    ready = setup(device, scale, notes)
    if ready is None:
        return {"rows": [], "notes": notes}
    cfg, batch, seq, dtype, dense, sets = ready
    flops = batch * seq * work.train_flops_per_token(dense, TARGETS, R, seq)
    res = adapters.run_peers(adapters.builders(dense, TARGETS, R, notes, frozen_base=False), make_step, sets,
                             device, EFFORT[scale], notes)
    times = {k: v["s"] for k, v in res.items()}
    model = (f"llama L{cfg['num_hidden_layers']} d{cfg['hidden_size']} ff{cfg['intermediate_size']} "
             f"V{cfg['vocab_size']}")
    for name, v in res.items():
        rows.append({"model": model, "dtype": dtype_name(dtype), "r": R, "tokens": f"{batch}x{seq}",
                     "peer": name, "ms": v["s"] * 1e3, "tokens/s": batch * seq / v["s"],
                     **ceilings.of(v["s"], 0, flops),
                     "speedup_vs_peft": adapters.speedup_vs_peft(times, name), "peak_MiB": v["peak_MiB"],
                     "held_MiB": v["held_MiB"]})
    return {"rows": rows, "notes": notes}

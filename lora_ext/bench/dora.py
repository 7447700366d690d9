"""The `dora` section: DoRA forward + backward, one square layer and the seven projections of a Llama block,
generation, and a training step of the train_step section's Llama (without and with gradient checkpointing):
ours (DoRA; QDoRA over NF4) against our LoRA on the same layers and PEFT's DoRA, with peak memory. PEFT
builds B A and W + s B A (out x in) at every forward to take the row norms; ours takes them from r x out
and r x r products and a cached ||W_i||^2."""
from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Optional

import torch
from torch import nn

from ..checkpointing import enable as enable_checkpointing
from ..dora import dora_caching
from ..model import get_peft_model
from . import adapters, machine, peers, train_step, work
from .decoder_block import DIMS as BLOCK_DIMS, TARGETS as BLOCK_TARGETS, Block
from .fwd_bwd import fwd_bwd_step, inputs
from .lora_layer import _Holder
from .timing import EFFORT

CASES = {  # (layer, r, M tokens)
    ("cuda", "full"): [("square", 16, 4096), ("block", 16, 4096)],
    ("cuda", "quick"): [("square", 16, 4096), ("block", 16, 4096)],
    ("cpu", "full"): [("square", 16, 512), ("block", 16, 256)],
    ("cpu", "quick"): [("square", 16, 256), ("block", 16, 128)],
}
# the square layer's side: a 7B model's hidden size, but 2048 in the CPU's quick run
SQUARE = {("cuda", "full"): 4096, ("cuda", "quick"): 4096, ("cpu", "full"): 4096, ("cpu", "quick"): 2048}
TINY = [("square", 4, 16), ("block", 4, 16)]
DECODE_TOKENS = 16  # a step of the decode case: one generate call's worth of tokens
CHECKPOINTED = ", checkpointing"  # the training step's peers with gradient checkpointing


def _square(n: int) -> nn.Module:
    return _Holder(nn.Linear(n, n, bias=False))


def _builders(dense: nn.Module, targets: list, r: int, notes: list, frozen_base: bool = True,
              checkpointing: bool = False) -> dict:
    """checkpointing: every decoder layer of a Hugging Face model recomputed in the backward (ours with
    use_gradient_checkpointing=True; PEFT's model prepared the same way, as prepare_model_for_kbit_training
    does), and the peers' names end in CHECKPOINTED."""
    suffix = CHECKPOINTED if checkpointing else ""

    def ours(use_dora, quantize_base=None):
        return lambda: get_peft_model(copy.deepcopy(dense), r=r, lora_alpha=2 * r, target_modules=targets,
                                      init_lora_weights=False, use_dora=use_dora, quantize_base=quantize_base,
                                      use_gradient_checkpointing=checkpointing)

    out = {"frozen base": lambda: copy.deepcopy(dense)} if frozen_base else {}
    out.update({"lora_ext LoRA" + suffix: ours(False), "lora_ext DoRA" + suffix: ours(True),
                "lora_ext QDoRA" + suffix: ours(True, "nf4")})
    peft = peers.peft(notes)
    if peft is not None:
        def peft_dora():
            cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                                  use_dora=True)
            model = copy.deepcopy(dense)
            enable_checkpointing(model, checkpointing)
            return peft.get_peft_model(model, cfg)

        out["PEFT DoRA" + suffix] = peft_dora
    return out


def _rows(name: str, dtype: torch.dtype, r: int, M: int, res: dict, ceilings, work_of) -> list:
    """Rows for run_peers results; work_of(peer) -> (bytes, flops) of one step. A checkpointed peer is
    compared with our LoRA and PEFT's DoRA checkpointed too."""
    def ratio(num: Optional[dict], den: Optional[dict], key: str):
        return None if num is None or den is None or num[key] is None or den[key] is None else num[key] / den[key]

    rows = []
    for peer, v in res.items():
        mode = CHECKPOINTED if peer.endswith(CHECKPOINTED) else ""
        lora, peft_dora = res.get("lora_ext LoRA" + mode), res.get("PEFT DoRA" + mode)
        rows.append({"layer": name, "dtype": str(dtype).replace("torch.", ""), "r": r, "M": M, "peer": peer,
                     "ms": v["s"] * 1e3, **ceilings.of(v["s"], *work_of(peer)), "x_our_lora": ratio(v, lora, "s"),
                     "speedup_vs_peft_dora": ratio(peft_dora, v, "s"),
                     "peak_MiB": v["peak_MiB"], "held_MiB": v["held_MiB"],
                     "peak_x_our_lora": ratio(v, lora, "peak_MiB")})
    return rows


class _Decoding(nn.Module):
    """DECODE_TOKENS forwards of one token each with grad off, as in one generate call, inside `caching`
    (ours: dora_caching, which takes the row norms once per call; PEFT's DoraCaching keeps them until train())."""

    def __init__(self, model: nn.Module, caching=None):
        super().__init__()
        self.model, self.caching = model, caching

    def forward(self, x):
        with torch.no_grad(), (self.caching() if self.caching else contextlib.nullcontext()):
            for i in range(x.shape[0]):
                self.model(x[i:i + 1])


def _decode_step(model: nn.Module) -> tuple:
    return model, [model]


def _decode(device: torch.device, dtype: torch.dtype, ceilings, kind: str, r: int, notes: list) -> list:
    """The block in generation: tokens one at a time, grad off; ours with and without dora_caching, PEFT's DoRA
    with and without its DoraCaching. Without a cache each token takes A W^T again (r passes over W)."""
    hidden, kv, mlp = BLOCK_DIMS[kind]
    dense = Block(hidden, kv, mlp).to(device=device, dtype=dtype).requires_grad_(False).eval()
    built = _builders(dense, BLOCK_TARGETS, r, notes, frozen_base=False)

    def decoding(name, caching=None):  # built when run_peers asks (on a GPU: one peer on the device at a time)
        return lambda: _Decoding(built[name]().eval(), caching)

    peers_ = {"lora_ext LoRA": decoding("lora_ext LoRA"), "lora_ext DoRA": decoding("lora_ext DoRA"),
              "lora_ext DoRA, dora_caching": decoding("lora_ext DoRA", dora_caching),
              "lora_ext QDoRA, dora_caching": decoding("lora_ext QDoRA", dora_caching)}
    if "PEFT DoRA" in built:
        peers_["PEFT DoRA"] = decoding("PEFT DoRA")
        caching = peers.attempt("peft.helpers.DoraCaching",
                                lambda: importlib.import_module("peft.helpers").DoraCaching, notes)
        if caching is not None:
            peers_["PEFT DoRA, DoraCaching"] = decoding("PEFT DoRA", caching)
    sets = inputs(DECODE_TOKENS, hidden, [], device, dtype)
    res = adapters.run_peers(peers_, _decode_step, sets, device, EFFORT["quick"], notes)

    def work_of(peer):
        per_token = [work.lora_decode(k, o, r, dtype, "QDoRA" in peer) for k, o in dense.shapes()]
        return tuple(DECODE_TOKENS * sum(w[i] for w in per_token) for i in (0, 1))

    return _rows(f"llama block {hidden}/{kv}/{mlp}, decode", dtype, r, DECODE_TOKENS, res, ceilings, work_of)


def _training_step(device: torch.device, ceilings, scale: str, r: int, notes: list) -> list:
    """A training step (forward, backward, AdamW) of the train_step section's Llama, every projection adapted;
    and again with gradient checkpointing, as QLoRA is usually trained, where the `x W^T` DoRA's op keeps
    for dm lives only while its layer's backward runs."""
    ready = train_step.setup(device, scale, notes)
    if ready is None:
        return []
    cfg, batch, seq, dtype, dense, sets = ready
    build = {**_builders(dense, train_step.TARGETS, r, notes, frozen_base=False),
             **_builders(dense, train_step.TARGETS, r, notes, frozen_base=False, checkpointing=True)}
    res = adapters.run_peers(build, train_step.make_step, sets, device, EFFORT[scale], notes)
    flops = batch * seq * work.train_flops_per_token(dense, train_step.TARGETS, r, seq)  # LoRA's; DoRA adds little
    name = f"training step, llama L{cfg['num_hidden_layers']} d{cfg['hidden_size']} ff{cfg['intermediate_size']}"
    return _rows(name, dtype, r, batch * seq, res, ceilings, lambda peer: (0, flops))


def run(device: torch.device, ceilings, scale: str) -> dict:
    notes, rows = [], []
    dtype = machine.activation_dtype(device)
    kind = "tiny" if scale == "tiny" else device.type
    for layer, r, M in TINY if scale == "tiny" else CASES[device.type, scale]:
        if layer == "square":
            n = 64 if scale == "tiny" else SQUARE[device.type, scale]
            dense, targets, name, outs = _square(n), ["proj"], f"{n}x{n}", [n]
        else:
            hidden, kv, mlp = BLOCK_DIMS[kind]
            dense, targets, name = Block(hidden, kv, mlp), BLOCK_TARGETS, f"llama block {hidden}/{kv}/{mlp}"
            outs = [hidden, kv, kv]  # the block's outputs: h, k, v
        dense = dense.to(device=device, dtype=dtype).requires_grad_(False)
        shapes = [(n, n)] if layer == "square" else dense.shapes()
        sets = inputs(M, shapes[0][0], outs, device, dtype)
        res = adapters.run_peers(_builders(dense, targets, r, notes), fwd_bwd_step, sets, device, EFFORT[scale], notes)

        def work_of(peer, M=M, shapes=shapes):
            # the LoRA layer's bytes and FLOPs; DoRA adds r x out and r x r products per layer (ours)
            per_layer = [work.lora_fwd_bwd(M, k, o, None if peer == "frozen base" else r, dtype,
                                           peer == "lora_ext QDoRA") for k, o in shapes]
            return tuple(sum(w[i] for w in per_layer) for i in (0, 1))

        rows += _rows(name, dtype, r, M, res, ceilings, work_of)
    rows += _decode(device, dtype, ceilings, kind, 4 if scale == "tiny" else 16, notes)
    rows += _training_step(device, ceilings, scale, train_step.R, notes)
    notes.append(f"decode: {DECODE_TOKENS} tokens a step, one at a time with grad off (M is the step's tokens)")
    notes.append(f"'{CHECKPOINTED.lstrip(', ')}' peers: every decoder layer recomputed in the backward; their "
                 f"ratios are against our LoRA and PEFT's DoRA with it too (the recomputation is not in the FLOPs)")
    return {"rows": rows, "notes": notes}

"""Gradient checkpointing for LoRA models, as Unsloth's `use_gradient_checkpointing` asks for it.

True: Hugging Face's own checkpointing of every decoder layer (reentrant, as PEFT's
prepare_model_for_kbit_training sets it up), with gradients enabled on the embeddings' output so that a
frozen embedding still lets gradients reach the adapters.

"unsloth": the same layers, but the hidden states each checkpointed layer keeps for its backward are
offloaded to pinned CPU memory, copied on a stream of their own while the GPU goes on, and copied back
for the backward (Unsloth's and torchtune's activation offloading). What stays on the GPU per layer is
nothing but its output; the price is two PCIe copies of each layer's input. On the CPU there is
nothing to offload to, and it is plain checkpointing.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = (False, True, "unsloth")


def check(model: nn.Module, mode) -> None:
    """That `mode` is one of MODES and the model can be checkpointed: before anything changes."""
    if not any(mode is m or (isinstance(m, str) and mode == m) for m in MODES):
        raise ValueError(f"use_gradient_checkpointing must be False, True or 'unsloth', got {mode!r}")
    if mode is not False and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"use_gradient_checkpointing={mode!r}: {type(model).__name__} does not support gradient "
                         f"checkpointing (transformers' supports_gradient_checkpointing is False)")


def enable(model: nn.Module, mode) -> None:
    """Turn on checkpointing of every decoder layer of a Hugging Face model (mode True or "unsloth")."""
    check(model, mode)
    if mode is False:
        return
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if mode == "unsloth":
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offloaded_checkpoint


def offloaded_checkpoint(function, *args):
    """function(*args) without keeping its activations: they are recomputed in the backward from its
    tensor arguments, which wait in pinned CPU memory meanwhile (on a CUDA device)."""
    return _OffloadedCheckpoint.apply(function, *args)


_streams: dict = {}


def _offload_stream(device: torch.device):
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class _Offloaded:
    """A CUDA tensor copied to pinned CPU memory on the offload stream (the copy overlaps the next layers'
    work), or a CPU tensor kept as it is."""

    def __init__(self, t: torch.Tensor):
        self.device, self.requires_grad = t.device, t.requires_grad
        if t.device.type != "cuda":
            self.data, self.done = t.detach(), None
            return
        stream = _offload_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the current stream
        with torch.cuda.stream(stream):
            self.data = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.data.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # the allocator must not reuse t's memory before the copy has read it
        self.done = stream.record_event()

    def restore(self) -> torch.Tensor:
        if self.done is None:
            t = self.data
        else:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.done)
            t = self.data.to(self.device, non_blocking=True)
        return t.detach().requires_grad_(self.requires_grad)


class _RngState:
    """The generators the layer may draw from (the CPU's: lora_ext's dropout seeds; each CUDA device of
    the arguments: attention dropout), so the recomputation draws the same numbers."""

    def __init__(self, devices):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices}

    def restore(self):
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda.items():
            torch.cuda.set_rng_state(state, d)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, *args):
        ctx.function = function
        tensors = [a for a in args if torch.is_tensor(a)]
        ctx.cuda_devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        ctx.device_type = tensors[0].device.type if tensors else "cpu"
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.rng = _RngState(ctx.cuda_devices)
        ctx.args = [_Offloaded(a) if torch.is_tensor(a) else a for a in args]
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [a.restore() if isinstance(a, _Offloaded) else a for a in ctx.args]
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=ctx.cuda_devices), torch.enable_grad(), \
                torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            ctx.rng.restore()
            outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.args = None  # the offloaded copies go now, not with the graph
        return (None, *[a.grad if torch.is_tensor(a) and a.requires_grad else None for a in inputs])

"""The fine-tuning run: build or load the model, put LoRA/QLoRA on it (or resume a saved adapter),
train with AdamW, and write the adapter (PEFT format), the loss curve, a JSON summary and, with
--merge, the merged model. Ctrl-C stops training and still saves what was trained."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch

from .. import checkpointing
from ..atomic import atomic_directory, write_file
from ..loraplus import create_loraplus_optimizer
from ..model import LoraModel, get_peft_model
from .base_model import default_model, local_model
from .cli import CHECKPOINTING, INITS
from .data import Windows, builtin_texts, read_texts, token_stream
from .report import peak_memory_mib, plot_losses, write_summary

STATE_NAME = "training_state.pt"


class _Stop:
    pressed = False
    signal = None  # the signal's name: "SIGINT" (Ctrl-C) or "SIGTERM" (schedulers, `timeout`)


@contextlib.contextmanager
def _stop_on_ctrl_c():
    """The first Ctrl-C, or a SIGTERM, stops the loop at the end of the step it lands in, so what is saved
    is whole steps and a resumed run continues exactly; a second Ctrl-C interrupts at once."""
    state = _Stop()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield state
        return

    def handler(signum, frame):
        if state.pressed and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state.pressed, state.signal = True, state.signal or signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible")
    return device


def _schedule(steps: int):
    warmup = max(1, min(20, steps // 10))

    def factor(step: int) -> float:  # linear warm-up, then cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def _eval_loss(model, batches: list) -> float:
    was_training = model.training
    model.eval()
    total = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    model.train(was_training)
    return total


def _previous_run(resume: str) -> tuple:
    """(adapter directory, training state or {}) of the run --resume names: a finetune --out directory,
    or an adapter directory alone."""
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume: no such directory: {resume}")
    nested = os.path.join(resume, "adapter")
    adapter = nested if os.path.isdir(nested) else resume
    state_path = os.path.join(resume, STATE_NAME)
    # On the CPU: the data generator's state must stay there; the optimizer moves its own state.
    state = torch.load(state_path, map_location="cpu", weights_only=True) if os.path.isfile(state_path) else {}
    return adapter, state


def _base_path(args, adapter_dir: Optional[str]) -> Optional[str]:
    """The base model's directory: --model, else the one the resumed adapter was trained on, else None
    (the built-in model)."""
    if args.model or not adapter_dir:
        return args.model
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        recorded = json.load(f).get("base_model_name_or_path")
    beside = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "base_model")  # a moved built-in run
    for candidate in (recorded, beside):
        if candidate and os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(f"--resume: the adapter was trained on {recorded!r}, which is not a local directory "
                            f"here; pass --model")


def _qlora(args, state: dict) -> bool:
    """--qlora/--no-qlora, or what the resumed run used; resuming with the other one is refused (the
    adapter learned to correct that base)."""
    before = state.get("qlora")
    if args.qlora is not None and before is not None and args.qlora != before:
        raise ValueError(f"--resume: that run trained {'QLoRA' if before else 'LoRA'}; drop "
                         f"--{'no-' if args.qlora is False else ''}qlora to continue it")
    return bool(args.qlora if args.qlora is not None else (True if before is None else before))


def _loraplus_ratio(args, state: dict):
    """--loraplus-ratio, or the resumed run's (its optimizer state has LoRA+'s parameter groups or not)."""
    before = state.get("loraplus_ratio") if state else None
    if state and args.loraplus_ratio is not None and args.loraplus_ratio != before:
        raise ValueError(f"--resume: that run trained with --loraplus-ratio {before}; drop --loraplus-ratio to "
                         f"continue it")
    return args.loraplus_ratio if args.loraplus_ratio is not None else before


def _optimizer(lora: LoraModel, lr: float, loraplus_ratio) -> torch.optim.Optimizer:
    if loraplus_ratio is not None:
        return create_loraplus_optimizer(lora, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio,
                                         weight_decay=0.0)
    return torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def _load_model(path: Optional[str], device: torch.device, seed: int):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 matmul is a slow fallback
    if path:
        return local_model(path, dtype)
    model, tok = default_model(seed)
    return model.to(dtype), tok


def run(args) -> dict:
    device = resolve_device(args.device)
    adapter_dir, state = _previous_run(args.resume) if args.resume else (None, {})
    qlora = _qlora(args, state)
    loraplus_ratio = _loraplus_ratio(args, state)
    init = INITS[args.init]
    if adapter_dir and init is not True:
        raise ValueError(f"--resume continues a trained adapter: --init {args.init} does not apply")
    data = args.data if args.data is not None else state.get("data")  # a resumed run keeps its text
    texts = builtin_texts() if data is None else read_texts(data)  # bad paths fail before any work
    base_path = _base_path(args, adapter_dir)
    model, tokenizer = _load_model(base_path, device, args.seed)
    windows = Windows(token_stream(texts, tokenizer), args.seq_len, seed=args.seed)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: a file is there, not a directory")
    # Nothing is written before every argument has been taken (below): a refused run leaves --out as it was.
    base_to_write = None
    if base_path is None:  # the adapter needs its base: the built-in one exists only here, so keep a copy
        base_path = os.path.join(args.out, "base_model")
        base_to_write = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_path = os.path.abspath(base_path)
    model.config.name_or_path = base_path
    model.to(device)
    quantize = "nf4" if qlora else None
    gradient_checkpointing = CHECKPOINTING[args.gradient_checkpointing]
    if adapter_dir:
        lora = LoraModel.from_pretrained(model, adapter_dir, quantize_base=quantize, is_trainable=True)
        checkpointing.enable(model, gradient_checkpointing)
    else:
        targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
        lora = get_peft_model(model, r=args.r, lora_alpha=args.alpha, target_modules=targets,
                              lora_dropout=args.dropout, use_rslora=args.rslora, quantize_base=quantize,
                              random_state=args.seed, init_lora_weights=init,
                              loftq_config={"loftq_bits": 4, "loftq_iter": 1} if init == "loftq" else None,
                              use_gradient_checkpointing=gradient_checkpointing)
        if init in ("pissa", "olora", "loftq"):  # the adapter belongs to the base the init made: keep that base
            base_path = os.path.abspath(os.path.join(args.out, "base_model"))
            base_to_write = lora.base_state_dict()
            model.config.name_or_path = base_path
            # the adapter is for that base: PEFT (and lora_ext) would take a "pissa"/"olora" init again on load
            lora.peft_config[lora.active_adapter].init_lora_weights = True
    lora.train()
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = _optimizer(lora, args.lr, loraplus_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args.steps))
    os.makedirs(args.out, exist_ok=True)
    if base_to_write is not None:
        _save_model(model, base_path, state_dict=base_to_write)
    start, losses, eval_losses = 0, [], {}
    if state:
        if "adapter" in state:  # the adapter of the same step as the optimizer state (see the save below)
            lora._copy_in(state["adapter"], lora.active_adapter, lora.peft_config[lora.active_adapter])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        windows.generator.set_state(state["generator"])
        start, losses, eval_losses = state["step"], state["losses"], state["eval_losses"]
    eval_batches = [b.to(device) for b in windows.eval_batches(args.batch_size)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    eval_losses.setdefault(start, _eval_loss(lora, eval_batches))

    from tqdm.auto import tqdm

    tokens_per_step = args.batch_size * args.seq_len
    eval_every = max(1, args.steps // 10)
    step, train_time = start, 0.0
    bar = tqdm(total=args.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15)  # a log file gets a line every 15 s, not every step
    with _stop_on_ctrl_c() as ctrl_c:
        try:
            while step < args.steps and not ctrl_c.pressed:
                t0 = time.perf_counter()
                batch = windows.batch(args.batch_size).to(device)
                loss = lora(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()  # synchronizes, so the step time below is real
                train_time += time.perf_counter() - t0
                losses.append(value)
                step += 1
                mem, _ = peak_memory_mib(device)
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens_per_step * (step - start) / train_time:,.0f}",
                                mem=f"{mem:,.0f}MiB")
                bar.update(1)
                if step % eval_every == 0:
                    eval_losses[step] = _eval_loss(lora, eval_batches)
        finally:
            bar.close()
    interrupted = ctrl_c.signal
    if interrupted:
        print(f"interrupted at step {step} ({interrupted}): saving what was trained so far", file=sys.stderr)
    if step not in eval_losses:
        eval_losses[step] = _eval_loss(lora, eval_batches)

    adapter_dir = os.path.join(args.out, "adapter")
    # The training state carries its own copy of the adapter, so a kill between the two saves cannot pair
    # one step's optimizer state with another step's adapter; each of the two is written atomically.
    checkpoint = {"step": step, "qlora": qlora, "data": data and os.path.abspath(data), "loraplus_ratio": loraplus_ratio,
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "generator": windows.generator.get_state(), "losses": losses, "eval_losses": eval_losses,
                  "adapter": {k: v.detach().cpu() for k, v in lora._adapter_state(lora.active_adapter).items()}}
    write_file(os.path.join(args.out, STATE_NAME), lambda tmp: torch.save(checkpoint, tmp))
    lora.save_pretrained(adapter_dir)
    peak, peak_kind = peak_memory_mib(device)
    trained, total = lora.get_nb_trainable_parameters()
    summary = {
        "model": args.model or "built-in Llama (config in lora_ext/finetune/base_model.py)",
        "base_model_path": base_path, "data": data or "built-in corpus (lora_ext/data)",
        "device": str(device), "qlora": qlora, "steps": step, "interrupted": interrupted,
        "resumed_from_step": start if args.resume else None,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "init": args.init,
        "gradient_checkpointing": args.gradient_checkpointing, "loraplus_ratio": loraplus_ratio,
        "lora": {k: v for k, v in lora.peft_config[lora.active_adapter].to_peft().items()
                 if k in ("r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules")},
        "trainable_params": trained, "all_params": total,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "held_out_loss": {str(k): v for k, v in eval_losses.items()},
        "tokens_per_s": tokens_per_step * (step - start) / train_time if train_time else None,
        "train_time_s": train_time,
        "peak_memory_MiB": peak, "peak_memory_kind": peak_kind,
        "adapter": os.path.abspath(adapter_dir),
    }
    if losses:
        plot_losses(losses, eval_losses, os.path.join(args.out, "loss.png"),
                    f"{'QLoRA' if qlora else 'LoRA'} fine-tuning, {step} steps")
    if args.merge:
        summary["merge"] = _merge(lora, eval_batches[0], os.path.join(args.out, "merged"), tokenizer)
    write_summary(summary, os.path.join(args.out, "summary.json"))
    return summary


def _save_model(model, directory: str, tokenizer=None, **kwargs) -> None:
    """A Hugging Face model (and tokenizer) saved into a new directory switched in whole."""
    with atomic_directory(directory, keep_existing=False) as new:
        model.save_pretrained(new, **kwargs)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(new)


@torch.no_grad()
def _merge(lora: LoraModel, batch: torch.Tensor, directory: str, tokenizer) -> dict:
    """Fold the adapter into dense weights (4-bit bases are dequantized first), save the plain model,
    and measure what merging changed: the logits of the merged model against the adapter's."""
    lora.eval()
    before = lora(input_ids=batch).logits.float()
    merged = lora.merge_and_unload(dequantize=True)
    after = merged(input_ids=batch).logits.float()
    _save_model(merged, directory, tokenizer)
    diff = after - before
    return {"path": os.path.abspath(directory), "max_abs_logit_error": diff.abs().max().item(),
            "relative_logit_error": (diff.norm() / before.norm()).item()}

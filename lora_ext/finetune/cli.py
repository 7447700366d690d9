"""`python -m lora_ext finetune` arguments, and the printout around a run."""
from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: a small built-in "
                                                 "Llama built from a config, nothing downloaded)")
    p.add_argument("--data", default=None, help=".txt, or .jsonl with a 'text' field (default: built-in corpus)")
    p.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="lora_alpha (scale = alpha/r, alpha/sqrt(r) with "
                                                             "--rslora)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized scaling alpha/sqrt(r)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--targets", default="all-linear", help="comma-separated module names (q_proj,v_proj,...) or "
                                                           "'all-linear'")
    p.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=None,
                   help="store the frozen base in NF4 (QLoRA, the default); --no-qlora keeps it dense (LoRA); "
                        "a resumed run keeps what it used")
    p.add_argument("--steps", type=positive_int, default=300, help="total optimizer steps (a resumed run "
                                                                    "continues up to this number)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when visible)")
    p.add_argument("--out", default="finetune_out", help="output directory")
    p.add_argument("--merge", action="store_true", help="also save the merged model and print the merge error")
    p.add_argument("--resume", default=None, help="a previous --out directory (or adapter directory) to continue; "
                                                  "its base model, --qlora and --data carry over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=list(INITS), default="default",
                   help="adapter initialisation: default (A kaiming, B zero), gaussian, pissa, olora (both change "
                        "the base weight), loftq (with --qlora: the base becomes the NF4 of what the adapter "
                        "does not hold); a run whose init changes the base saves that base as out/base_model")
    p.add_argument("--gradient-checkpointing", choices=list(CHECKPOINTING), default="off",
                   help="recompute each decoder layer in the backward (on), and keep its input in CPU memory "
                        "meanwhile (unsloth; plain checkpointing on the CPU)")
    p.add_argument("--loraplus-ratio", type=float, default=None,
                   help="LoRA+: lora_B learns this many times faster than lora_A (PEFT's parameter groups)")


INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
CHECKPOINTING = {"off": False, "on": True, "unsloth": "unsloth"}


def run(args) -> int:
    from .train import run as train

    try:
        summary = train(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    held = summary["held_out_loss"]
    first, last = list(held.values())[0], list(held.values())[-1]
    print(f"\n{'QLoRA' if summary['qlora'] else 'LoRA'} on {summary['device']}: {summary['steps']} steps"
          f"{' (interrupted)' if summary['interrupted'] else ''}, held-out loss {first:.3f} -> {last:.3f}, "
          f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, peak memory {summary['peak_memory_MiB']:,.0f} MiB "
          f"({summary['peak_memory_kind']})")
    print(f"adapter (PEFT format): {summary['adapter']}")
    print(f"loss curve and summary: {args.out}/loss.png, {args.out}/summary.json")
    if "merge" in summary:
        m = summary["merge"]
        print(f"merged model: {m['path']}; merge error: max |logit change| {m['max_abs_logit_error']:.3g}, "
              f"relative {m['relative_logit_error']:.3g}")
    if summary["interrupted"] == "SIGTERM":  # a scheduler's stop: saved, but the job did not finish
        print(f"finetune: stopped by SIGTERM after step {summary['steps']}; everything is saved, continue with "
              f"--resume {args.out}", file=sys.stderr)
        return 128 + 15
    return 0

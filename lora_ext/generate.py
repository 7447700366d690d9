"""`python -m lora_ext generate`: text from many adapters of one base at once. Each prompt names its adapter
("__base__" for none); prompts are generated in mixed batches (LoraModel.generate(adapter_names=...)), and
the run prints every continuation and the tokens per second.

Offline by default: the finetune's built-in base and two small adapters trained on two of the built-in
texts (Aesop's fables, Alice), kept in --out and reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .atomic import write_text
from .finetune.cli import positive_int

DEMO = {"aesop": "aesop_fables.txt", "alice": "alice_chapter_one.txt"}
DEMO_PROMPTS = [("A Fox once saw", "aesop"), ("Alice was very", "alice"), ("A Fox once saw", "__base__"),
                ("Alice was very", "aesop"), ("The Lion said", "aesop"), ("The Rabbit said", "alice")]


def _adapter_arguments(given: list) -> dict:
    """--adapter NAME=DIR values: name -> directory, each a directory."""
    out = {}
    for value in given:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter {value!r}: expected NAME=DIR (a name for the adapter, '=', its directory)")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--adapter {value!r}: {directory} is not a directory")
        out[name] = directory
    return out


def add_arguments(p) -> None:
    p.add_argument("--prompts", default=None, help=".jsonl with 'prompt' and 'adapter' per line (default: a few "
                                                   "built-in prompts over the two demo adapters and the base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter directory (PEFT format) under a name; repeat for more (default: the demo "
                        "adapters, trained on first use)")
    p.add_argument("--model", default=None, help="the base model's directory (default: the adapters' recorded base)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per mixed batch")
    p.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=True, help="the base in NF4")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="generate_out", help="where the demo adapters and generations.jsonl go")
    p.add_argument("--train-steps", type=positive_int, default=60, help="steps of each demo adapter's training")


def _demo_adapters(out: str, steps: int) -> dict:
    """Two adapters of the built-in base, trained once (finetune) and reused: name -> adapter directory."""
    from importlib import resources

    from .finetune.cli import add_arguments as finetune_arguments
    from .finetune.train import run as finetune

    found = {}
    base = None
    for name, text in DEMO.items():
        run_dir = os.path.join(out, name)
        if not os.path.isfile(os.path.join(run_dir, "adapter", "adapter_config.json")):
            parser = argparse.ArgumentParser()
            finetune_arguments(parser)
            data = str(resources.files("lora_ext") / "data" / text)
            argv = ["--data", data, "--steps", str(steps), "--out", run_dir, "--batch-size", "4", "--seq-len", "64",
                    "--r", "8", "--lr", "5e-3"] + (["--model", base] if base else [])
            print(f"generate: training the demo adapter {name!r} ({steps} steps on {text})", file=sys.stderr)
            finetune(parser.parse_args(argv))
        base = base or os.path.join(run_dir, "base_model")
        found[name] = os.path.join(run_dir, "adapter")
    return found


def _prompts(path) -> list:
    if path is None:
        return list(DEMO_PROMPTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts: no such file: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append((str(row["prompt"]), str(row.get("adapter", "__base__"))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--prompts: line {n} must be a JSON object with 'prompt' (and 'adapter'): {e}")
    if not out:
        raise ValueError(f"--prompts: {path} has no prompts")
    return out


def _load(adapters: dict, base_path, qlora: bool, device):
    from .finetune.train import _load_model  # the finetune's model and tokenizer rules
    from .model import LoraModel

    first, *rest = adapters.items()
    if base_path is None:
        with open(os.path.join(first[1], "adapter_config.json")) as f:
            base_path = json.load(f).get("base_model_name_or_path")
    if not base_path or not os.path.isdir(base_path):
        raise FileNotFoundError(f"generate: the base model {base_path!r} is not a local directory; pass --model")
    model, tokenizer = _load_model(base_path, device, seed=0)
    model.to(device)
    lora = LoraModel.from_pretrained(model, first[1], adapter_name=first[0], quantize_base="nf4" if qlora else None)
    for name, directory in rest:
        lora.load_adapter(directory, name)
    return lora.eval(), tokenizer


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer, text: str) -> list:
    from .finetune.data import ByteTokenizer

    ids = tokenizer.encode(text)
    return ids[:-1] if isinstance(tokenizer, ByteTokenizer) else ids  # a prompt, not a finished text: no EOS


def _decode(tokenizer, ids: list) -> str:
    from .finetune.data import ByteTokenizer

    return tokenizer.decode(ids) if isinstance(tokenizer, ByteTokenizer) else \
        tokenizer.decode(ids, skip_special_tokens=True)


def _batch(tokenizer, texts: list, device):
    """Left-padded ids and attention mask (generation appends on the right)."""
    import torch

    ids = [_encode(tokenizer, t) for t in texts]
    width = max(len(i) for i in ids)
    pad = _pad_id(tokenizer)
    rows = [[pad] * (width - len(i)) + i for i in ids]
    mask = [[0] * (width - len(i)) + [1] * len(i) for i in ids]
    return torch.tensor(rows, device=device), torch.tensor(mask, device=device)


def run(args) -> int:
    import torch

    from .finetune.train import resolve_device

    try:
        device = resolve_device(args.device)
        adapters = _adapter_arguments(args.adapter) if args.adapter else \
            _demo_adapters(args.out, args.train_steps)
        prompts = _prompts(args.prompts)
        unknown = sorted({a for _, a in prompts} - set(adapters) - {"__base__"})
        if unknown:
            raise ValueError(f"the prompts name adapters that were not given: {unknown}; adapters: "
                             f"{sorted(adapters)} (and '__base__' for the base alone)")
        lora, tokenizer = _load(adapters, args.model, args.qlora, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"generate: {e}", file=sys.stderr)
        return 2
    results, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        ids, mask = _batch(tokenizer, [p for p, _ in chunk], device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lora.generate(input_ids=ids, attention_mask=mask, adapter_names=[a for _, a in chunk],
                                max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=_pad_id(tokenizer))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        for (prompt, adapter), row in zip(chunk, out[:, ids.shape[1]:].tolist()):
            new_tokens += len(row)
            results.append({"prompt": prompt, "adapter": adapter, "completion": _decode(tokenizer, row)})
    write_text(os.path.join(args.out, "generations.jsonl"), "".join(json.dumps(r) + "\n" for r in results))
    for r in results:
        print(f"[{r['adapter']}] {r['prompt']!r} -> {r['completion']!r}")
    print(f"\n{len(results)} prompts over {len({r['adapter'] for r in results})} adapters (incl. the base) in mixed "
          f"batches of up to {args.batch_size}: {new_tokens / seconds:,.0f} new tokens/s on {device}")
    return 0

"""`python -m lora_ext [finetune|generate|bench|demo]`; with no command it runs `finetune` on its defaults."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from . import generate
    from .bench import cli as bench_cli
    from .finetune import cli as finetune_cli

    parser = argparse.ArgumentParser(prog="python -m lora_ext")
    sub = parser.add_subparsers(dest="command")
    finetune_cli.add_arguments(sub.add_parser("finetune", help="LoRA/QLoRA fine-tuning of a causal LM "
                                                                "(default: offline tiny Llama, built-in corpus)"))
    generate.add_arguments(sub.add_parser("generate", help="text from many adapters of one base in mixed batches "
                                                           "(default: offline, two demo adapters)"))
    bench_cli.add_arguments(sub.add_parser("bench", help="kernel and layer benchmarks against the installed peers"))
    demo = sub.add_parser("demo", help="quantize a layer to NF4, check it against bitsandbytes, run it")
    demo.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "generate":
        return generate.run(args)
    if args.command == "demo":
        from . import demo as demo_mod

        summary = demo_mod.main(args.device)
        return 0 if summary.get("bit_exact_with_bitsandbytes") in (True, None) else 1
    if args.command is None:
        args = parser.parse_args(["finetune"])
    return finetune_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())

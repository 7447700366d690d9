"""`python -m lora_ext [demo|bench]`; with no command it runs the demo."""
from __future__ import annotations

import argparse
import json
import sys


SECTIONS = {
    "nf4": ["kernel", "shape", "dtype", "peer", "ms", "GB/s", "fraction_of_copy_bw", "speedup_vs_bitsandbytes"],
    "nf4_matmul": ["N", "K", "M", "peer", "ms", "TFLOP/s", "fraction_of_copy_bw", "speedup_vs_bitsandbytes"],
    "merge": ["W", "dtype", "r", "impl", "ms", "GB/s", "fraction_of_copy_bw", "speedup_vs_torch"],
    "lora_layer": ["layer", "dtype", "r", "M", "impl", "ms", "x_frozen_base", "speedup_vs_peft", "peak_MiB"],
}


def _bench(args) -> int:
    import importlib

    import torch

    from .bench import report

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda requested but no CUDA device is visible", file=sys.stderr)
        return 2
    results = {"torch": torch.__version__, "device": args.device, "quick": args.quick}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    for name in args.only or list(SECTIONS):
        result = importlib.import_module(f".bench.{name}", __package__).run(args.device, quick=args.quick)
        results[name] = result
        bw = result["copy_bandwidth_GBps"]
        print(f"\n## {name} on {result['device']}" + (f": copy bandwidth {bw:.1f} GB/s (read + write, measured in "
                                                       "this run)" if bw == bw else ""))
        print(report.table(result["rows"], SECTIONS[name]))
        for note in result["notes"]:
            print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ext")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="quantize a layer to NF4, check it against bitsandbytes, run it")
    demo.add_argument("--device", default="cpu")
    bench = sub.add_parser("bench", help="kernel benchmarks against the installed peers")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    from . import demo as demo_mod

    summary = demo_mod.main(getattr(args, "device", "cpu"))
    return 0 if summary.get("bit_exact_with_bitsandbytes") in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())

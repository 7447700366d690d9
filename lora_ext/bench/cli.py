"""`python -m lora_ext bench`: the kernel, layer and training-step benchmarks against the installed peers,
with the two ceilings measured in the same run."""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback

from ..atomic import write_text

_TAIL = ["ms", "bound", "fraction_of_ceiling"]
_MEM = ["peak_MiB", "held_MiB"]
# section -> (module, table columns); the columns before "peer" name a case (the plot groups by them).
SECTIONS = {
    "nf4": ("nf4", ["kernel", "shape", "dtype", "peer", *_TAIL, "GB/s", "speedup_vs_bitsandbytes"]),
    "nf4_matmul": ("nf4_matmul", ["N", "K", "M", "peer", *_TAIL, "TFLOP/s", "speedup_vs_bitsandbytes"]),
    "merge": ("merge", ["W", "dtype", "r", "peer", *_TAIL, "fraction_of_fp64_roofline", "GB/s", "speedup_vs_torch"]),
    "lora_layer": ("lora_layer", ["layer", "dtype", "r", "M", "peer", *_TAIL, "x_frozen_base", "speedup_vs_peft",
                                  *_MEM]),
    "layers": ("decoder_block", ["block", "dtype", "r", "M", "peer", *_TAIL, "x_frozen_base", "speedup_vs_peft",
                                 *_MEM]),
    "train_step": ("train_step", ["model", "dtype", "r", "tokens", "peer", *_TAIL, "tokens/s", "speedup_vs_peft",
                                  *_MEM]),
    "checkpointing": ("checkpointing", ["model", "dtype", "tokens", "peer", *_TAIL, "speedup_vs_no_checkpointing",
                                        "peak_MiB"]),
    "inits": ("inits", ["layer", "dtype", "r", "peer", *_TAIL, "speedup_vs_pissa"]),
    "dora": ("dora", ["layer", "dtype", "r", "M", "peer", *_TAIL, "x_our_lora", "speedup_vs_peft_dora", *_MEM,
                     "peak_x_our_lora"]),
    "multi": ("multi", ["layer", "dtype", "mode", "adapters", "peer", *_TAIL, "lora_part_ms", "lora_floor_ms",
                        "lora_part_vs_one_adapter", "speedup_vs_peft"]),
}


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases: a short run")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--plot", default=None, help="also draw the results into this PNG (needs matplotlib)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")


def run(args, scale: str | None = None) -> int:
    """scale: "full" or "quick" (from --quick) unless given; tests pass "tiny" (shapes that only prove the
    code runs)."""
    import torch

    from . import ceilings, machine, report

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda requested but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # said now, not after minutes of running
        print("bench: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    scale = scale or ("quick" if args.quick else "full")
    device = torch.device(args.device)
    ceil = ceilings.measure(device, scale)
    results = {"torch": torch.__version__, "device": args.device, "quick": args.quick, "scale": scale,
               "ceilings": ceil.as_dict(), "cpu": machine.cpu()}
    print(f"## cpu: {machine.describe(results['cpu'])}")
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    print(f"## ceilings on {device.type}: {ceil.describe()}; fraction_of_ceiling is against the roofline they draw")
    failed = []
    for name in args.only or list(SECTIONS):
        module, columns = SECTIONS[name]
        print(f"\n## {name} on {device.type}", flush=True)
        try:
            result = importlib.import_module(f".{module}", __package__).run(device, ceil, scale)
        except Exception:  # noqa: BLE001  (one broken section must not cost the others' numbers)
            failed.append(name)
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr)
            continue
        result["notes"] = list(dict.fromkeys(result["notes"]))  # the same skip, once per case, said once
        results[name] = result
        print(report.table(result["rows"], columns))
        for note in result["notes"]:
            print(f"note: {note}")
        if args.json:  # after every section: a run cut short keeps what it measured
            write_text(args.json, json.dumps(results, indent=2))
    if device.type == "cpu" and {"lora_layer", "layers", "train_step", "dora"} & set(args.only or SECTIONS):
        print("\nnote: held_MiB counts the tensors each peer holds (weights, quant state, gradients, optimizer "
              "state); peak_MiB on the CPU is held_MiB plus the most one step adds at once, from the profiler's "
              "allocation records (tensors only; on a GPU it is the allocator's peak)")
    if args.json:
        write_text(args.json, json.dumps(results, indent=2))
    if args.plot:
        from . import plot

        plot.write(args.plot, results, {name: cols for name, (_, cols) in SECTIONS.items()
                                        if name in results and name not in failed})
    if failed:
        print(f"bench: sections failed: {', '.join(failed)} (tracebacks above and in the JSON)", file=sys.stderr)
        return 1
    return 0

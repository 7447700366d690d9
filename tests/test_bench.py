"""`python -m lora_ext bench`: argument handling, the JSON (every section, every row against a ceiling of
the same run), the PNG, and peers that are missing. The bench runs on tiny shapes (cli.run(scale="tiny")):
these tests check what the bench reports, never how fast anything is."""
import argparse
import json
import math
import os
import struct
import sys

import pytest
import torch

from lora_ext.bench import cli, memory, peers
from lora_ext.bench.ceilings import Ceilings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m lora_ext bench")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])  # (width, height)


@pytest.mark.parametrize("argv, bad", [(["--device", "tpu"], "'tpu'"), (["--only", "nf5"], "'nf5'"),
                                       (["--only", "nf4", "layer"], "'layer'")])
def test_bad_arguments_are_argparse_errors(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and bad in err


def test_arguments_parsed():
    args = parse(["--device", "cpu", "--quick", "--only", "merge", "train_step", "--json", "r.json", "--plot", "p.png"])
    assert (args.device, args.quick, args.only, args.json, args.plot) == ("cpu", True, ["merge", "train_step"],
                                                                         "r.json", "p.png")
    assert parse([]).only is None and parse([]).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_cuda_without_a_gpu_returns_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.run(parse(["--device", "cuda", "--json", str(out)])) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not out.exists()


def test_roofline_picks_the_binding_ceiling():
    c = Ceilings(copy_Bps=100.0, matmul_flops=1000.0, matmul_dtype="float32", matmul_n=1)
    assert c.of(2.0, nbytes=50, flops=100) == {"bound": "copy", "fraction_of_ceiling": 0.25}
    assert c.of(2.0, nbytes=10, flops=800) == {"bound": "matmul", "fraction_of_ceiling": 0.4}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    rc = cli.run(parse(["--json", str(d / "r.json"), "--plot", str(d / "r.png")]), scale="tiny")
    return rc, json.loads((d / "r.json").read_text()), d / "r.png"


def test_json_has_every_section_and_each_row_its_fraction_of_ceiling(tiny_run):
    rc, res, _ = tiny_run
    assert rc == 0
    ceil = res["ceilings"]
    assert ceil["copy_bandwidth_GBps"] > 0 and ceil["matmul_TFLOPs"] > 0
    for name in cli.SECTIONS:
        rows = res[name]["rows"]
        assert rows, f"{name}: no rows ({res[name]['notes']})"
        for row in rows:
            frac = row["fraction_of_ceiling"]
            assert row["bound"] in ("copy", "matmul") and math.isfinite(frac) and frac > 0, (name, row)
            # The roofline is the larger of the two bounds: never below either one alone, equal to the binding one.
            if "GB/s" in row:
                by_copy = row["GB/s"] / ceil["copy_bandwidth_GBps"]
                assert frac >= by_copy * (1 - 1e-9), (name, row)
                if row["bound"] == "copy":
                    assert frac == pytest.approx(by_copy, rel=1e-9), (name, row)
            if "TFLOP/s" in row:
                by_matmul = row["TFLOP/s"] / ceil["matmul_TFLOPs"]
                assert frac >= by_matmul * (1 - 1e-9), (name, row)
                if row["bound"] == "matmul":
                    assert frac == pytest.approx(by_matmul, rel=1e-9), (name, row)


def test_the_run_says_which_cpu_it_measured(tiny_run):
    """The CPU's model, threads, torch's dispatch level and the features that pick code paths, as /proc/cpuinfo
    and torch report them (so a reader can tell which machine a number came from)."""
    from lora_ext.bench import machine

    cpu = tiny_run[1]["cpu"]
    assert cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["threads"] == torch.get_num_threads()
    if os.path.exists("/proc/cpuinfo"):
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
        assert cpu["features"] == [f for f in machine.FLAGS if f in flags]


def test_every_installed_peer_is_in_the_run(tiny_run):
    _, res, _ = tiny_run

    def ran(section):
        return {r["peer"] for r in res[section]["rows"]}

    assert {"lora_ext", "reference (pure PyTorch)"} <= ran("nf4")
    assert {"lora_ext", "dense bf16 torch.matmul", "dequantize + torch.matmul"} <= ran("nf4_matmul")
    assert {"frozen base", "lora_ext LoRA", "lora_ext QLoRA"} <= ran("layers")
    assert {"lora_ext LoRA", "lora_ext QLoRA"} <= ran("train_step")
    installed = {name: fn([]) is not None for name, fn in
                 [("bitsandbytes", peers.bitsandbytes), ("peft", peers.peft), ("torchao", peers.torchao_to_nf4)]}
    assert ("bitsandbytes" in ran("nf4")) == installed["bitsandbytes"]
    assert ("bitsandbytes matmul_4bit" in ran("nf4_matmul")) == installed["bitsandbytes"]
    assert ("torchao NF4Tensor" in ran("nf4")) == installed["torchao"]
    assert ("torchao NF4Tensor" in ran("nf4_matmul")) == installed["torchao"]
    for section in ("lora_layer", "layers", "train_step"):
        assert ("PEFT LoRA" in ran(section)) == installed["peft"]
        assert ("PEFT QLoRA (bitsandbytes)" in ran(section)) == (installed["peft"] and installed["bitsandbytes"])
    # QLoRA holds the 4-bit weights: of the dense weights' bytes (the frozen base's row) it saves more than 60%
    # whether the run is in fp32 (4-bit: 1/8 of them, plus scales) or bf16 (1/4; on a CPU with avx512_bf16).
    held = {r["peer"]: r["held_MiB"] for r in res["layers"]["rows"]}
    assert held["lora_ext LoRA"] - held["lora_ext QLoRA"] > 0.6 * held["frozen base"]


def test_cpu_rows_have_a_peak_of_at_least_what_they_hold(tiny_run):
    _, res, _ = tiny_run
    for section in ("lora_layer", "layers", "train_step", "dora", "checkpointing"):
        for row in res[section]["rows"]:
            assert row["peak_MiB"] is not None and row["peak_MiB"] > 0, (section, row)
            if "held_MiB" in row:
                assert row["peak_MiB"] >= row["held_MiB"], (section, row)


def test_dora_training_step_compares_checkpointed_peers_with_checkpointed_ones(tiny_run):
    from lora_ext.bench.dora import CHECKPOINTED

    rows = {r["peer"]: r for r in tiny_run[1]["dora"]["rows"] if r["layer"].startswith("training step")}
    for mode in ("", CHECKPOINTED):
        lora, peft_dora = rows["lora_ext LoRA" + mode], rows.get("PEFT DoRA" + mode)
        for peer in ("lora_ext LoRA", "lora_ext DoRA", "lora_ext QDoRA"):
            row = rows[peer + mode]
            assert row["x_our_lora"] == pytest.approx(row["ms"] / lora["ms"]), row
            assert row["peak_x_our_lora"] == pytest.approx(row["peak_MiB"] / lora["peak_MiB"]), row
            if peft_dora is not None:
                assert row["speedup_vs_peft_dora"] == pytest.approx(peft_dora["ms"] / row["ms"]), row
    assert ("PEFT DoRA" + CHECKPOINTED in rows) == (peers.peft([]) is not None)


def test_dora_bench_checkpointed_peers_checkpoint_every_decoder_layer():
    from lora_ext.bench import dora, train_step

    notes = []
    _, _, _, _, dense, _ = train_step.setup(torch.device("cpu"), "tiny", notes)
    built = dora._builders(dense, train_step.TARGETS, 4, notes, frozen_base=False, checkpointing=True)
    assert len(built) == 3 + (peers.peft([]) is not None)
    for name, build in built.items():
        assert name.endswith(dora.CHECKPOINTED)
        layers = [m for m in build().modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert layers and all(m.gradient_checkpointing for m in layers), name


def test_step_peak_counts_what_a_step_allocates_and_frees():
    """Sizes known here: the step frees the 5 MiB its last run kept, then holds a 1 MiB matmul output (made
    by an ATen kernel, first: a workspace it may take stays below the peak) and 3 + 7 MiB at once, frees them
    and keeps 5 MiB again: 11 - 5 = 6 MiB above its start."""
    kept = {}
    x = torch.randn(512, 256)

    def step():
        kept.pop("old", None)
        c = x @ x.t()  # 512 x 512 fp32: 1 MiB
        a = torch.empty(3 << 20, dtype=torch.uint8)
        b = torch.empty(7 << 20, dtype=torch.uint8)
        del a, b, c
        kept["old"] = torch.empty(5 << 20, dtype=torch.uint8)

    peak = memory.step_peak_above_start_MiB(step, ())
    assert peak is not None and abs(peak - 6.0) < 0.05, peak


def test_plot_is_a_png_with_a_panel_per_section(tiny_run):
    _, res, png = tiny_run
    matmul_shapes = {(r["N"], r["K"]) for r in res["nf4_matmul"]["rows"]}
    panels = len(cli.SECTIONS) - 1 + len(matmul_shapes)  # nf4_matmul: a panel per weight shape
    assert png_size(png) == (1100, round(360 * panels))


def test_only_runs_and_plots_the_sections_asked_for(tmp_path):
    args = parse(["--only", "merge", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert cli.run(args, scale="tiny") == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert [name for name in cli.SECTIONS if name in res] == ["merge"]
    assert png_size(tmp_path / "r.png") == (1100, 360)


def test_missing_peers_are_notes_not_failures(tmp_path, monkeypatch):
    hidden = ("peft", "bitsandbytes", "torchao")
    for mod in [m for m in sys.modules if m.split(".")[0] in hidden] + list(hidden):
        monkeypatch.setitem(sys.modules, mod, None)  # importing it now raises ImportError, as if not installed
    args = parse(["--only", "nf4", "layers", "--json", str(tmp_path / "r.json")])
    assert cli.run(args, scale="tiny") == 0
    res = json.loads((tmp_path / "r.json").read_text())
    notes = " | ".join(res["nf4"]["notes"] + res["layers"]["notes"])
    for name in hidden:
        assert f"{name} skipped" in notes
    assert {r["peer"] for r in res["layers"]["rows"]} == {"frozen base", "lora_ext LoRA", "lora_ext QLoRA"}
    assert {r["peer"] for r in res["nf4"]["rows"]} == {"lora_ext", "lora_ext (into workspace)",
                                                       "reference (pure PyTorch)"}


def test_a_failing_section_costs_only_itself(tmp_path, monkeypatch, capsys):
    import lora_ext.bench.merge as merge_section

    def broken(device, ceilings, scale):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(merge_section, "run", broken)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert cli.run(parse(["--only", "merge", "nf4", "--json", str(out), "--plot", str(png)]), scale="tiny") == 1
    results = json.loads(out.read_text())
    assert "kernel exploded" in results["merge"]["error"]
    assert results["nf4"]["rows"]  # the section after it still ran
    assert png_size(png)[0] > 0
    assert "sections failed: merge" in capsys.readouterr().err

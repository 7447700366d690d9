"""LoRA and QLoRA under DDP and FSDP2 with 2 processes (torchrun, gloo, CPU): after the same steps the
adapters equal a single-process run over the same global batch, the adapter saved from the sharded
model loads in one process with the same logits, and FSDP2 holds half the base on each rank."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lora_ext

from conftest import requires_c

pytestmark = requires_c
pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import distributed_worker as worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = [s for s in worker.SCENARIOS if "refuses" not in s]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "tests", "distributed_worker.py"), str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(2)]
    return out, ranks


def _reference(scenario):
    model = worker.build(scenario)
    losses = worker.train(model)
    return model.eval(), losses


@pytest.mark.parametrize("scenario", TRAINED)
def test_two_ranks_train_what_one_process_trains(two_ranks, scenario):
    out, ranks = two_ranks
    for r in ranks:
        assert "error" not in r[scenario], r[scenario]
    reference, ref_losses = _reference(scenario)
    # Each rank's loss is over its half of the batch; their mean is the global batch's loss.
    rank_mean = [(a + b) / 2 for a, b in zip(ranks[0][scenario]["losses"], ranks[1][scenario]["losses"])]
    assert rank_mean == pytest.approx(ref_losses, rel=1e-5)
    directory = str(out / scenario)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(directory, "adapter_model.safetensors"))
    layers = reference.lora_layers()
    dora = "dora" in scenario
    assert len(saved) == (3 if dora else 2) * len(layers)
    for name, layer in layers.items():
        if dora:  # the magnitude, trained and gathered from its shards as A and B are
            torch.testing.assert_close(saved[f"base_model.model.{name}.lora_magnitude_vector"],
                                       layer.lora_magnitude_vector.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.detach(),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved[f"base_model.model.{name}.lora_B.weight"], layer.lora_B.detach(),
                                   rtol=1e-4, atol=1e-5)
    fresh = worker.build(scenario, adapter_seed=1)
    fresh.load_adapter(directory, "default")
    # The logits carry the adapters' difference from the one-process run (up to ~5e-5 of their size: the
    # all-reduce adds the halves' gradients in another order, and Adam's normalization magnifies that).
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=worker.probe_ids()).logits,
                                   reference(input_ids=worker.probe_ids()).logits, rtol=1e-4, atol=3e-4)


@pytest.mark.parametrize("scenario", [s for s in TRAINED if s.startswith("fsdp2")])
def test_fsdp2_shards_the_base_and_reloads_onto_shards(two_ranks, scenario):
    _, ranks = two_ranks
    for r in ranks:
        b = r[scenario]["bytes"]
        # Half the frozen base (NF4 packed bytes too) and half the adapters per rank; dim-0 padding aside.
        assert b["base_total"] / 2 <= b["base_local"] <= b["base_total"] / 2 + 4096, b
        assert b["adapter_local"] * 2 == b["adapter_total"], b
        assert r[scenario]["sharded_reload_max_diff"] <= 1e-6
    if "qlora" in scenario or "qdora" in scenario:
        dense = ranks[0]["fsdp2-lora"]["bytes"]["base_total"]
        assert ranks[0][scenario]["bytes"]["base_total"] < dense / 3  # 4-bit (+ embeddings) against fp32


def test_fsdp2_refuses_a_policy_that_would_cast_packed_bytes(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert "stored as torch.bfloat16, and the mixed-precision policy would cast them to torch.float16" in \
            r["fsdp2-refuses-cast"]["refused"]


def test_nf4_layer_keeps_its_packed_bytes_through_casts_and_refuses_a_cast_copy():
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(3, 64)
    for storage in (torch.uint8, torch.bfloat16):
        layer = lora_ext.NF4Linear.from_linear(linear, quant_storage=storage)
        y = layer(x)
        layer.to(torch.float16)  # model.half(): the bias follows, the 4-bit data and its scales do not
        assert layer.weight.dtype == storage and layer.nested_absmax.dtype == torch.float32
        assert layer.bias.dtype == torch.float16
        torch.testing.assert_close(layer(x.half()).float(), y, atol=3e-3, rtol=3e-3)
    layer.weight.data = layer.weight.data.to(torch.float16)  # what a mixed-precision all-gather would hand over
    with pytest.raises(RuntimeError, match="stored as torch.bfloat16 but arrived as torch.float16"):
        layer(x.half())



def test_packed_weights_are_viewed_as_float_where_fsdp2_cannot_hold_integers(monkeypatch):
    """torch < 2.13's fully_shard refuses uint8 parameters; fully_shard_lora then views the packed bytes
    as the policy's float dtype (bf16 without one): the same bytes, the same outputs. A layer whose bytes
    are not a whole number of that dtype is refused by name, and no layer is changed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lora_ext import distributed

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 30))
    model = torch.nn.Sequential(*[lora_ext.NF4Linear.from_linear(m) for m in model])
    x = torch.randn(5, 64)
    y, packed = model(x), [m.weight.detach().clone() for m in model]
    if distributed.fsdp2_holds_integer_parameters():
        assert distributed.view_packed_weights_for_fsdp2(model) == 0 and model[0].weight.dtype == torch.uint8
    monkeypatch.setattr(distributed, "fsdp2_holds_integer_parameters", lambda: False)
    # 48 x 30 / 2 = 720 bytes divide into fp32 (4 bytes), 64 x 48 / 2 = 1536 too; 30 x 7 / 2 = 105 do not.
    odd = torch.nn.Sequential(model[0], lora_ext.NF4Linear.from_linear(torch.nn.Linear(7, 30)))
    with pytest.raises(ValueError, match=r"1: .*FSDP2 cannot shard integer parameters.*105 bytes.*torch.float32"):
        distributed.view_packed_weights_for_fsdp2(odd, MixedPrecisionPolicy(param_dtype=torch.float32))
    assert odd[0].weight.dtype == torch.uint8 and odd[1].weight.dtype == torch.uint8
    assert distributed.view_packed_weights_for_fsdp2(model) == 2
    for m, before in zip(model, packed):
        assert m.weight.dtype == torch.bfloat16 and not m.weight.requires_grad
        assert torch.equal(m.weight.view(torch.uint8).view(-1), before.view(-1))
    assert torch.equal(model(x), y)
    assert distributed.view_packed_weights_for_fsdp2(model) == 0  # already float: nothing to do

# Twice so far (a full suite run, and a CI run under torch 2.11), torch's gloo teardown aborted a rank after the
# example had finished and written its adapter ("terminate called without an active exception": a thread destroyed
# unjoined, in destroy_process_group or at interpreter exit; 15 of 15 reruns passed). Such a run is repeated once;
# any other failure, or that one twice, fails the test.
_GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def test_the_example_runs_under_torchrun(tmp_path):
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               os.path.join(ROOT, "examples", "distributed_qlora.py"), "--strategy", "fsdp2", "--steps",
                               "2", "--seq-len", "32", "--out", str(tmp_path)],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                              timeout=600)
        finished_then_aborted = "adapter (PEFT format)" in proc.stdout and _GLOO_TEARDOWN_ABORT in proc.stderr
        if proc.returncode == 0 or not finished_then_aborted or attempt == 1:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2: loss" in proc.stdout and "rank 1: base" in proc.stdout
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 16

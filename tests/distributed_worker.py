"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU), and imported by it
for the single-process reference: the same model, data and steps either way."""
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

import lora_ext
from lora_ext.distributed import fully_shard_lora, rank_bytes

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16
SCENARIOS = ["ddp-lora", "ddp-qlora", "ddp-qlora-checkpointing", "fsdp2-lora", "fsdp2-qlora",
             "fsdp2-qlora-bf16storage", "ddp-dora", "fsdp2-qdora", "fsdp2-refuses-cast"]


def build(scenario: str, adapter_seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    storage = torch.bfloat16 if "bf16storage" in scenario or "refuses" in scenario else torch.uint8
    four_bit = any(k in scenario for k in ("qlora", "qdora", "refuses"))
    return lora_ext.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=adapter_seed,
                                   quantize_base="nf4" if four_bit else None, quant_storage=storage,
                                   use_dora="dora" in scenario)


def batches():
    return torch.randint(0, 96, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def probe_ids():
    return torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(8))


def train(model, rank: int = 0, world: int = 1) -> list:
    """STEPS AdamW steps, this rank on its share of each global batch (the whole batch when world == 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for ids in batches():
        mine = ids[rank::world]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run(scenario: str, out: str, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    lora = build(scenario)
    report = {}
    if scenario == "fsdp2-refuses-cast":
        try:
            fully_shard_lora(lora, mesh=init_device_mesh("cpu", (world,)),
                             mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16))
        except ValueError as e:
            report["refused"] = str(e)
        return report
    if scenario.startswith("ddp"):
        if "checkpointing" in scenario:
            lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            lora.enable_input_require_grads()
        model = torch.nn.parallel.DistributedDataParallel(lora)
        report["losses"] = train(model, rank, world)
    else:
        fully_shard_lora(lora, mesh=init_device_mesh("cpu", (world,)))
        report["bytes"] = rank_bytes(lora)
        report["losses"] = train(lora, rank, world)
    directory = os.path.join(out, scenario)
    lora.save_pretrained(directory)  # every rank: gathers the sharded adapters; rank 0 writes
    dist.barrier()
    with torch.no_grad():
        trained = lora(input_ids=probe_ids()).logits
        if scenario.startswith("fsdp2"):  # load onto a sharded model (another init), in place
            other = build(scenario, adapter_seed=1)
            fully_shard_lora(other, mesh=init_device_mesh("cpu", (world,)))
            other.load_adapter(directory, "default")
            report["sharded_reload_max_diff"] = (other(input_ids=probe_ids()).logits - trained).abs().max().item()
    return report


def main(out: str, scenarios: list) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # two ranks on two cores
    results = {}
    for scenario in scenarios:
        try:
            results[scenario] = run(scenario, out, rank, world)
        except Exception as e:  # noqa: BLE001  (reported to the test, which names the scenario)
            results[scenario] = {"error": f"{type(e).__name__}: {e}"}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or SCENARIOS)

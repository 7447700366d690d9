"""QLoRA (or LoRA) fine-tuning on several processes with PyTorch's own engines, DDP or FSDP2.

    torchrun --nproc_per_node 2 examples/distributed_qlora.py --strategy fsdp2          # CPU (gloo)
    torchrun --nproc_per_node 8 examples/distributed_qlora.py --strategy fsdp2 \\
        --model path/to/llama --data notes.jsonl --steps 500 --out run                # GPUs (nccl)

Each rank draws its own batches; DDP averages the adapters' gradients, FSDP2 also shards every
parameter (the NF4 packed bytes included) across the ranks. Rank 0 writes the adapter (PEFT format).
"""
import argparse
import os

import torch
import torch.distributed as dist

import lora_ext
from lora_ext.distributed import fully_shard_lora, rank_bytes
from lora_ext.finetune.base_model import default_model, local_model
from lora_ext.finetune.data import Windows, builtin_texts, read_texts, token_stream


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], default="fsdp2")
    p.add_argument("--model", default=None, help="local Hugging Face model directory (default: built-in tiny Llama)")
    p.add_argument("--data", default=None, help=".txt or .jsonl (default: the built-in corpus)")
    p.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default="distributed_out")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    model, tokenizer = local_model(args.model, dtype) if args.model else default_model(seed=0)
    model.to(device=device, dtype=dtype)
    lora = lora_ext.get_peft_model(model, r=16, lora_alpha=32, target_modules="all-linear",
                                   quantize_base="nf4" if args.qlora else None)  # same seed on every rank
    texts = builtin_texts() if args.data is None else read_texts(args.data)
    windows = Windows(token_stream(texts, tokenizer), args.seq_len, seed=1000 + rank)  # each rank its own batches

    if args.strategy == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(lora, device_ids=[device.index] if cuda else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        trained = fully_shard_lora(lora, mesh=init_device_mesh(device.type, (world,)))
    held = rank_bytes(lora)
    print(f"rank {rank}: base {held['base_local'] / 2**20:.2f} of {held['base_total'] / 2**20:.2f} MiB, "
          f"adapters {held['adapter_local'] / 2**20:.2f} of {held['adapter_total'] / 2**20:.2f} MiB, "
          f"buffers {held['buffers'] / 2**20:.2f} MiB", flush=True)
    opt = torch.optim.AdamW([q for q in lora.parameters() if q.requires_grad], lr=args.lr)  # after sharding
    for step in range(1, args.steps + 1):
        ids = windows.batch(args.batch_size).to(device)
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step}: loss {mean.item() / world:.3f}", flush=True)
    lora.save_pretrained(os.path.join(args.out, "adapter"))  # every rank gathers; rank 0 writes
    if rank == 0:
        print(f"adapter (PEFT format): {os.path.join(args.out, 'adapter')}")
    dist.barrier()  # no rank tears the group down while another still uses it (rank 0 writing the adapter)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

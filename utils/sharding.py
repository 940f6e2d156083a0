"""Sharding, shown running: ``torchrun --nproc_per_node 2 -m utils.sharding [--steps 3]`` shards the embedded tiny
Mistral with torch's FSDP2 (``fully_shard``, one unit per decoder layer as ``configs/accelerate/fsdp.yaml``) over gloo,
trains a few steps on the sample dialogues and gathers the full weights on rank 0 as a save would. Notebook 03's Trainer
runs on CPU processes are DDP: accelerate turns FSDP on for accelerator devices only (``accelerate/state.py``)."""

from __future__ import annotations

import argparse
import os
import sys

from utils import ConfigError, say
from utils.assets import ensure_tiny_model, load_tokenizer
from utils.data.prepared import prepared_dataset
from utils.hardware import SMOKE

ROWS = 2  # rows per batch on each rank


def prepared_sample() -> str:
    """The prepared sample dialogues (``runs/data/``), prepared if they are not there yet."""
    return str(prepared_dataset(SMOKE.dataset, load_tokenizer(None)))


def batches(folder: str, rank: int, world: int, length: int = 128) -> list:
    """This rank's batches of rows cut or padded to ``length`` tokens, as many on every rank (one more step would wait
    in FSDP's all-gather while the others gather the weights, and gloo would abort them all), or ConfigError."""
    import datasets
    import torch

    ids = datasets.load_from_disk(folder)["train"]["input_ids"]
    if len(ids) < ROWS * world:
        raise ConfigError(
            f"the prepared sample has {len(ids)} training rows: too few for {world} ranks of {ROWS} rows each "
            f"(--nproc_per_node {len(ids) // ROWS} at most)"
        )
    mine = [row[:length] + [0] * (length - len(row[:length])) for row in ids[rank::world][: len(ids) // world]]
    return [torch.tensor(mine[start : start + ROWS]) for start in range(0, len(mine) - ROWS + 1, ROWS)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node 2 -m utils.sharding")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    if "RANK" not in os.environ:
        print("error: start it with torchrun --nproc_per_node 2 -m utils.sharding", file=sys.stderr)
        return 2
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    if rank != 0:
        dist.barrier()  # rank 0 builds the model folder and prepares the data (once) while the others wait
    model_dir, folder = ensure_tiny_model(), prepared_sample()
    if rank == 0:
        dist.barrier()
    try:
        data = batches(folder, rank, world)
    except ConfigError as exc:  # the same on every rank: rank 0 says it
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:  # as accelerate's FSDP plugin with MistralDecoderLayer as the unit to wrap
        fully_shard(layer)
    fully_shard(model)
    held = sum(p.to_local().numel() for p in model.parameters())
    say(f"[rank {rank}/{world}] holds {held:,} of {total:,} parameters ({100 * held / total:.0f}%)")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, ids in zip(range(1, args.steps + 1), data, strict=False):
        labels = ids.masked_fill(ids == 0, -100)  # no loss on the padding
        loss = model(input_ids=ids, labels=labels).loss  # each rank: its own rows; FSDP gathers each layer in turn
        loss.backward()  # gradients reduce-scattered: each rank keeps its half
        optimizer.step()
        optimizer.zero_grad()
        say(f"[rank {rank}/{world}] step {step} its own loss {loss.item():.4f}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        say(f"gathered on rank 0 for saving: {sum(t.numel() for t in full.values()):,} parameters")
    dist.barrier()  # no rank closes its connections while the other still reads from them (gloo aborts then)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

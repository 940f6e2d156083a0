"""Notebook 03's arithmetic: keeping the card's global batch on any number of GPUs, and what fits in memory.

    python -m utils.scaling --gpus 8 --per-device 8          # accumulation and steps per epoch
    python -m utils.scaling --table                          # the memory-fit table for Mistral-7B

Memory model (per GPU, bytes), after the ZeRO paper (Rajbhandari et al., 2020, Fig. 1): mixed-precision Adam keeps
2 bytes/parameter of bf16 weights, 2 of bf16 gradients and K = 12 of fp32 optimizer states (master weights,
momentum, variance): 16 bytes/parameter in all, divided by the number of GPUs for what each strategy shards. Plus
activations with gradient checkpointing (Korthikanti et al., 2022: a block's input per layer kept, one block
recomputed at a time) and the fp32 logits of the loss, plus a fixed reserve for the CUDA context and fragmentation.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

GIB = 2**30

# Mistral-7B-v0.1 (MistralConfig defaults)
MISTRAL_7B = dict(params=7_241_732_096, layers=32, hidden=4096, vocab=32_000)
STRATEGIES = ("ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp")
RESERVE_GIB = 2.5  # CUDA context, NCCL buffers, allocator fragmentation


def accumulation_for(global_batch: int, num_gpus: int, per_device: int) -> int:
    """Gradient accumulation steps so that ``per_device * num_gpus * accumulation == global_batch``."""
    if min(global_batch, num_gpus, per_device) <= 0:
        raise ValueError("global batch, GPU count and per-device batch must be positive")
    per_step = per_device * num_gpus
    if global_batch % per_step:
        raise ValueError(f"a global batch of {global_batch} is not a multiple of {per_device} per device x "
                         f"{num_gpus} GPUs = {per_step}; choose a per-device batch that divides {global_batch // num_gpus or 1}")
    return global_batch // per_step


def steps_per_epoch(packed_sequences: int, global_batch: int) -> int:
    """Optimizer steps in one epoch of ``packed_sequences`` sequences (the last partial batch counts)."""
    return math.ceil(packed_sequences / global_batch)


@dataclass(frozen=True)
class Estimate:
    """Per-GPU memory of a full fine-tune, in GiB, and whether it fits."""

    strategy: str
    gpus: int
    gpu_gib: int
    per_device_batch: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    reserve: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib


def model_states_bytes(params: int, strategy: str, gpus: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per GPU under ``strategy`` with mixed-precision Adam (K=12)."""
    w, g, o = 2.0 * params, 2.0 * params, 12.0 * params
    if strategy == "ddp":
        return w, g, o
    if strategy == "zero1":
        return w, g, o / gpus
    if strategy == "zero2":
        return w, g / gpus, o / gpus
    if strategy == "zero2_offload":
        return w, g / gpus, 0.0
    if strategy in ("zero3", "fsdp"):
        return w / gpus, g / gpus, o / gpus
    if strategy == "zero3_offload":
        return w / gpus, g / gpus, 0.0
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def activation_bytes(per_device_batch: int, seq_len: int = 2048, layers: int = 32, hidden: int = 4096,
                     vocab: int = 32_000, checkpointing: bool = True) -> float:
    """Activation memory of one micro-batch: checkpointed block inputs + one block's working set + fp32 logits."""
    tokens = per_device_batch * seq_len
    block = 34 * tokens * hidden  # one transformer block with flash/sdpa attention (no s^2 term), bf16
    kept = layers * 2 * tokens * hidden if checkpointing else layers * block
    logits = 2 * 4 * tokens * vocab  # fp32 logits and their gradient
    return kept + (block if checkpointing else 0) + logits


def estimate(strategy: str, gpus: int, gpu_gib: int, per_device_batch: int = 8, seq_len: int = 2048,
             model: dict = MISTRAL_7B) -> Estimate:
    """Per-GPU memory of a full fine-tune of ``model`` (default Mistral-7B) with gradient checkpointing."""
    w, g, o = model_states_bytes(model["params"], strategy, gpus)
    act = activation_bytes(per_device_batch, seq_len, model["layers"], model["hidden"], model["vocab"])
    return Estimate(strategy, gpus, gpu_gib, per_device_batch, w / GIB, g / GIB, o / GIB, act / GIB, RESERVE_GIB)


def fit_table(per_device_batch: int = 8, gpu_counts=(1, 2, 4, 8, 16), gpu_sizes=(16, 24, 40, 80)):
    """A pandas DataFrame: per-GPU GiB for each strategy and GPU count, with a fits/does-not-fit mark per GPU size."""
    import pandas as pd

    rows = []
    for strategy in STRATEGIES:
        for n in gpu_counts:
            e = estimate(strategy, n, 80, per_device_batch)
            row = {"strategy": strategy, "gpus": n, "GiB per GPU": round(e.total, 1)}
            row.update({f"{size} GB": "fits" if e.total <= size else "-" for size in gpu_sizes})
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=16)
    parser.add_argument("--per-device", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--packed-sequences", type=int, default=None, help="from notebook 01's report.json")
    parser.add_argument("--table", action="store_true", help="print the memory-fit table")
    args = parser.parse_args(argv)
    try:
        accumulation = accumulation_for(args.global_batch, args.gpus, args.per_device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.gpus} GPUs x {args.per_device} per device x {accumulation} accumulation = {args.global_batch}")
    if args.packed_sequences:
        print(f"{steps_per_epoch(args.packed_sequences, args.global_batch)} optimizer steps per epoch")
    if args.table:
        print(fit_table(args.per_device).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

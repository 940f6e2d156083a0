"""Prints docs/gpu_plans.md's table: the plan of a recipe on every GPU shape (``utils.plan.shape_plans``).

python -m tools.gpu_plans [--config configs/sft_qlora.yaml]
"""

from __future__ import annotations

import argparse
import sys

from utils.plan import checkpoint_every, shape_plans


def markdown_table(plans: dict[str, dict]) -> str:
    """One row per GPU shape (docs/gpu_plans.md): what the profile chose and what the run would take."""
    head = (
        "| --gpu | profile | compute dtype | mixed precision | attention | checkpointing | batch | trainable weights "
        "| memory (GiB) | one epoch (estimate) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, p in plans.items():
        v = {k: x["value"] for k, x in p["settings"].items()}
        every = checkpoint_every(v)
        checkpointing = ["none", "every layer"][every] if every < 2 else f"every {every}nd layer"
        e = p["estimates"]
        rows.append(
            f"| {name} | {p['profile']} | {v['dtype']} | {'bf16' if v['bf16'] else 'fp16' if v['fp16'] else 'none'} "
            f"| {v['attn_implementation']} | {checkpointing} "
            f"| {v['per_device_train_batch_size']} x {v['gradient_accumulation_steps']} x {p['world_size']} "
            f"| {p['parts']['trainable weights'].split(' (')[0]} "
            f"| {e['memory_gib']} of {e['gpu_memory_gib']} ({'fits' if e['fits'] else 'does not fit'}) "
            f"| ~{e['epoch_hours']:,} h |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_plans", description="The plan of a recipe on every GPU shape"
    )
    parser.add_argument("--config", default="configs/sft_qlora.yaml")
    args = parser.parse_args(argv)
    print(markdown_table(shape_plans(args.config)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

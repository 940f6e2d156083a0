"""Notebook 03's arithmetic: keeping the card's global batch on any number of GPUs, and what fits in memory.

python -m utils.scaling --gpus 8 --per-device 8          # accumulation and steps per epoch
python -m utils.scaling --table                          # the memory-fit table for Mistral-7B
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from types import SimpleNamespace

from utils import DATA_DIR
from utils.hardware import GPU_PROFILES, SHAPES

GIB = 2**30

# Mistral-7B-v0.1 (MistralConfig defaults)
MISTRAL_7B = dict(params=7_241_732_096, layers=32, hidden=4096, kv=1024, intermediate=14_336, vocab=32_000)
STRATEGIES = ("ddp", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp")
RESERVE_GIB = 2.5
# ultrachat_200k's train_sft packed into 2,048-token rows, estimated offline from its published size (docs/card_era.md),
# 5% over the card's: only a check of that method; the reference is utils.hardware.ULTRACHAT_PACKED_ROWS.
ULTRACHAT_PACKED_ESTIMATE = 146_735


def accumulation_for(global_batch: int, num_gpus: int, per_device: int) -> int:
    """Gradient accumulation steps so that ``per_device * num_gpus * accumulation == global_batch``."""
    if min(global_batch, num_gpus, per_device) <= 0:
        raise ValueError("global batch, GPU count and per-device batch must be positive")
    per_step = per_device * num_gpus
    if global_batch % per_step:
        raise ValueError(
            f"a global batch of {global_batch} is not a multiple of {per_device} per device x "
            f"{num_gpus} GPUs = {per_step}; choose a per-device batch that divides {global_batch // num_gpus or 1}"
        )
    return global_batch // per_step


def steps_per_epoch(packed_sequences: int, global_batch: int) -> int:
    """Optimizer steps in one epoch of ``packed_sequences`` sequences (the last partial batch counts)."""
    return math.ceil(packed_sequences / global_batch)


def model_states_bytes(params: int, strategy: str, gpus: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per GPU, after the ZeRO paper (Rajbhandari et al., 2020, Fig. 1):
    mixed-precision Adam keeps 2 bytes/parameter of bf16 weights, 2 of gradients and K = 12 of fp32 optimizer states.
    ZeRO-1 shards the optimizer states, ZeRO-2 the gradients too, ZeRO-3 (and FSDP) the weights too; offload moves
    the optimizer states to the CPU."""
    w, g, o = 2.0 * params, 2.0 * params, 12.0 * params
    if strategy.startswith(("zero3", "fsdp")):
        w /= gpus
    if strategy.startswith(("zero2", "zero3", "fsdp")):
        g /= gpus
    if strategy != "ddp":
        o = 0.0 if strategy.endswith("offload") else o / gpus
    return w, g, o


# The GPU that stands for each size class, and the GiB torch reports for it (a T4's "16 GB" are 14.7 GiB).
GPU_CLASSES = {16: "t4", 24: "l4", 40: "a100-40gb", 80: "h100"}
USABLE_GIB = {gb: SHAPES[name].memory_gib for gb, name in GPU_CLASSES.items()}


def estimate(strategy: str, gpus: int, gpu_gb: int, per_device_batch: int = 8, seq_len: int = 2048) -> SimpleNamespace:
    """Per-GPU GiB of a full fine-tune of Mistral-7B with activation checkpointing, by part (``PARTS``), their ``total``
    and whether it ``fits`` GPUs sold as ``gpu_gb`` GB (16, 24, 40 or 80; 0: no verdict). The reserve is a fixed
    allowance for the CUDA context, NCCL buffers and fragmentation."""
    w, g, o = model_states_bytes(MISTRAL_7B["params"], strategy, gpus)
    tokens, hidden = per_device_batch * seq_len, MISTRAL_7B["hidden"]
    block = 34 * tokens * hidden  # one transformer block with flash/sdpa attention (no s^2 term), bf16
    # Korthikanti et al., 2022: each layer's checkpointed input, one block recomputed at a time; fp32 logits and grad
    act = MISTRAL_7B["layers"] * 2 * tokens * hidden + block + 2 * 4 * tokens * MISTRAL_7B["vocab"]
    parts = dict(weights=w / GIB, gradients=g / GIB, optimizer=o / GIB, activations=act / GIB, reserve=RESERVE_GIB)
    total = sum(parts.values())
    return SimpleNamespace(**parts, total=total, fits=total <= (USABLE_GIB[gpu_gb] if gpu_gb else 0.0))


# the parts of a full fine-tune's memory per GPU, as fit_table's columns, and their colours
PARTS = dict(weights="#4C72B0", gradients="#DD8452", optimizer="#55A868", activations="#C44E52", reserve="#8C8C8C")


def fit_table(per_device_batch: int = 8):
    """A DataFrame: per-GPU GiB of each strategy and GPU count, by part, and whether it fits each GPU size class."""
    import pandas as pd

    rows = []
    for strategy in STRATEGIES:
        for n in (1, 2, 4, 8, 16):
            e = estimate(strategy, n, 0, per_device_batch)
            parts = {part: round(getattr(e, part), 1) for part in PARTS}
            fits = {f"{size} GB ({gib} GiB)": "fits" if e.total <= gib else "-" for size, gib in USABLE_GIB.items()}
            rows.append({"strategy": strategy, "gpus": n, **parts, "GiB per GPU": round(e.total, 1), **fits})
    return pd.DataFrame(rows)


def plot_full_memory(per_device_batch: int = 8, gpus: int = 8):
    """Notebook 03's figure of ``fit_table``: left, every part of each strategy's estimate on ``gpus`` GPUs (the CUDA
    reserve too, so a bar's length is what must fit); right, the total per GPU against the GPU count. Dotted lines:
    what a GPU of each size class reports, in GiB."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fit = fit_table(per_device_batch)
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    rows = fit[fit.gpus == gpus].set_index("strategy")
    left = 0.0
    for part, color in PARTS.items():
        label = f"CUDA reserve ({RESERVE_GIB} GiB)" if part == "reserve" else part
        bars.barh(rows.index, rows[part], left=left, color=color, label=label)
        left = left + rows[part]
    guides = bars.secondary_xaxis("top")  # the GPU sizes, labelled above the bars they cut through
    guides.set_xticks(list(USABLE_GIB.values()), [str(gib) for gib in USABLE_GIB.values()])
    guides.set_xlabel(f"GiB that a {', '.join(map(str, USABLE_GIB))} GB GPU reports", fontsize=8, color="grey")
    guides.tick_params(labelsize=8, colors="grey")
    bars.invert_yaxis()
    bars.set(xlabel=f"GiB per GPU ({gpus} GPUs, batch {per_device_batch} per device)", xlim=(0, 130))
    bars.legend(fontsize=8, loc="lower right")
    bars.set_title(f"Where each engine's memory goes, on {gpus} GPUs", pad=8)
    styles = {"ddp": "o-", "zero2": "s--", "zero2_offload": "^-.", "zero3": "D-", "zero3_offload": "v:", "fsdp": "x--"}
    for strategy, style in styles.items():
        sub, fsdp = fit[fit.strategy == strategy], strategy == "fsdp"
        label = strategy + (" (= zero3)" if fsdp else "")
        lines.plot(sub.gpus, sub["GiB per GPU"], style, label=label, markersize=10 if fsdp else 7, alpha=0.9)
    for size, gib in USABLE_GIB.items():  # what a GPU of each size class reports
        bars.axvline(gib, color="grey", linestyle=":", linewidth=0.8)
        lines.axhline(gib, color="grey", linewidth=0.6, linestyle=":")
        lines.text(18.5, gib, f"{size} GB:\n{gib} GiB", va="center", fontsize=7, color="grey")
    lines.set_xscale("log", base=2)
    lines.set_yscale("log")
    lines.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    lines.set_yticks([10, 20, 40, 80, 120], ["10", "20", "40", "80", "120"])
    lines.yaxis.set_minor_formatter(NullFormatter())
    # ylim: room under the lowest line for the legend
    lines.set(xlim=(0.8, 28), ylim=(5.5, 150), xlabel="GPUs", ylabel="GiB per GPU (every part, the reserve too)")
    lines.set_title(f"Mistral-7B full fine-tune, batch {per_device_batch} per device: total per GPU")
    lines.legend(ncol=2, fontsize=8, loc="lower left")
    names = ", ".join(f"{SHAPES[name].name}: {USABLE_GIB[size]}" for size, name in GPU_CLASSES.items())
    note = f"Dotted lines: the GiB torch reports for each size class (utils.hardware.SHAPES: {names})"
    fig.text(0.01, 0.01, note, fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


# --- QLoRA on one GPU ------------------------------------------------------------------------------------------------
def h200_measurements() -> dict:
    """The QLoRA measurements on an H200 (docs/benchmarks.md): tokens/s and peak memory by attention, checkpointing."""
    return json.loads((DATA_DIR / "measurements" / "h200_qlora.json").read_text())


def measured_qlora_gib() -> dict[int, float]:
    """Peak reserved GiB measured for QLoRA at 4 x 2,048 tokens, by checkpoint_every (flex_attention where measured)."""
    rows = sorted(h200_measurements()["rows"], key=lambda r: r["attn"] != "flex_attention")  # flex_attention first
    return {r["checkpoint_every"]: r["peak_reserved_gib"] for r in reversed(rows) if r["packed"]}  # the first wins


def lora_parameters(r: int = 16) -> int:
    """LoRA parameters on q, k, v, o, gate, up and down: r x (in + out) per matrix, per layer."""
    h, kv, ff = MISTRAL_7B["hidden"], MISTRAL_7B["kv"], MISTRAL_7B["intermediate"]
    return r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + ff) + (ff + h)) * MISTRAL_7B["layers"]


def qlora_memory(checkpoint_every: int = 1, batch: int = 4, seq_len: int = 2048, r: int = 16) -> dict[str, float]:
    """Peak GPU memory of QLoRA training, in GiB, by part. Weights: the linear layers in 4-bit NF4 (0.5 byte + a 4-byte
    absmax per 64 values), embeddings and lm_head in 16-bit, LoRA in fp32; LoRA gradients in fp32; optimizer: Adam's two
    fp32 moments of the LoRA weights. Activations per token and layer: 34 x hidden bytes for a 16-bit block (Korthikanti
    et al., 2022, no s^2 term with sdpa/flex), plus LoRA's inputs kept for its gradients: dropout output (2 bytes) and
    mask (1 byte) for the six hidden-wide inputs and the intermediate-wide one; a checkpointed layer keeps only its
    2 x hidden-byte input, and one layer is recomputed at a time; plus the fp32 logits and their gradient."""
    h, layers, ff, vocab = MISTRAL_7B["hidden"], MISTRAL_7B["layers"], MISTRAL_7B["intermediate"], MISTRAL_7B["vocab"]
    linear = layers * (2 * h * h + 2 * h * MISTRAL_7B["kv"] + 3 * h * ff)
    lora, tokens = lora_parameters(r), batch * seq_len
    block = 34 * h + 3 * (6 * h + ff)  # bytes per token, one layer, activations kept
    checkpointed = math.ceil(layers / checkpoint_every) if checkpoint_every else 0
    activations = tokens * ((layers - checkpointed) * block + checkpointed * 2 * h + (block if checkpointed else 0))
    return {
        "weights": (linear * (0.5 + 4 / 64) + 2 * vocab * h * 2 + 4 * lora) / GIB,
        "LoRA gradients": 4 * lora / GIB,
        "optimizer": 8 * lora / GIB,
        "activations": (activations + 2 * 4 * tokens * vocab) / GIB,
    }


def plot_qlora_memory():
    """A stacked bar per GPU profile (its checkpointing policy): estimated parts, with the measurement marked and
    labelled by the GPU it was measured on (the measurement file's ``device``)."""
    import matplotlib.pyplot as plt

    device = h200_measurements()["device"]
    profiles = {p.description.replace(": ", ":\n", 1): p.checkpoint_every for p in GPU_PROFILES}
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for i, every in enumerate(profiles.values()):
        left = 0.0
        for (part, gib), color in zip(qlora_memory(every).items(), PARTS.values(), strict=False):
            ax.barh(i, gib, left=left, color=color, label=part if i == 0 else None)
            left += gib
        measured = measured_qlora_gib()[every]
        label = f"measured on one {device}" if i == 0 else None
        ax.plot(measured, i, marker="|", markersize=22, color="black", label=label)
        note = f"{left:.1f} GiB estimated,\n{measured} GiB measured on the {device}"
        ax.text(max(left, measured) + 1.5, i, note, va="center", fontsize=8)
    ax.set_yticks(range(len(profiles)), list(profiles), fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="GiB at the peak (QLoRA of Mistral-7B, 4 x 2048 tokens per micro-batch)", xlim=(0, 120))
    ax.set_title("Where a QLoRA step's memory goes, by activation checkpointing")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    return fig


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

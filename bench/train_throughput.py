"""Benchmark: QLoRA training speed of Mistral-7B with our settings against plain TRL defaults, on one GPU.

    python bench/train_throughput.py                  # on a GPU: ~10 minutes, prints one table
    python bench/train_throughput.py --cpu-smoke      # the tiny model on the CPU: runs every code path, no numbers

The model is the Mistral-7B architecture (``MistralConfig`` defaults) with random weights, saved once and loaded
4-bit NF4 through ``utils.sft.load_model``, exactly as notebook 02 loads the real one: speed and memory do not
depend on the weights' values. The data are synthetic token dialogues with an UltraChat-like length mix.

Variants:
  baseline   plain TRL defaults: the recipe's LoRA and batch (4 x 2), no packing, sdpa, padded batches
  ours       bfd packing, padding-free, sdpa, checkpointing every layer (the settings before flex_attention)
  ours+...   one speed option at a time: flex_attention, flex_attention with checkpointing every 2nd layer or
             none (the gpu-40gb and gpu-80gb profiles), flash-attention 2, Liger kernels, paged 8-bit AdamW,
             sdpa without checkpointing or every 2nd layer
  profile    the settings utils/hardware.py picks for this GPU
Each reports loss-carrying tokens/s, seconds per step, peak allocated and reserved memory, and MFU.

Method: the first variant in a process runs 10-30% slow (CUDA and Triton warm-up), so one warm-up run comes first
and is discarded; then every variant runs ``--repeats`` times (default 2), in alternating order (forward, then
backward, ...), and the table reports each one's median tokens/s and its largest peak memory.

MFU counts, per loss-carrying token, 2N FLOPs forward + 2N backward through the activations (the frozen base gets
no weight gradients; LoRA's are negligible) + 2N recomputation when activations are checkpointed, with N the
parameters of the linear layers (lm_head included), plus attention 4*L*s*d per token (half of 8*L*s*d for causal
masking, forward + backward, x1.5 with recomputation). Peak bf16 throughput by GPU name, or --peak-tflops.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "T4": 65.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}
SEQ = 2048


@dataclass
class Variant:
    name: str
    per_device: int = 4
    accumulation: int = 2
    packing: bool = False
    attn: str = "sdpa"
    checkpointing: bool = True
    checkpoint_kwargs: dict = field(default_factory=lambda: {"use_reentrant": False})
    optim: str = "adamw_torch"
    liger: bool = False
    needs: str | None = None  # "cuda", "flash_attn", "liger_kernel": skipped with a reason when missing


def variants(profile_name: str) -> list[Variant]:
    from utils.sft import PROFILE_TRAINING

    p = PROFILE_TRAINING.get(profile_name, PROFILE_TRAINING["gpu-40gb"])
    ours = Variant(
        "ours",
        p["per_device_train_batch_size"],
        p["gradient_accumulation_steps"],
        packing=True,
        optim=p.get("optim", "adamw_torch"),
    )
    flex = replace(ours, name="ours + flex_attention", attn="flex_attention", needs="triton")
    every2 = {"use_reentrant": False, "every_n_layers": 2}
    return [
        Variant("baseline (TRL defaults)"),
        ours,
        flex,
        replace(flex, name="ours + flex_attention + checkpoint every 2nd layer", checkpoint_kwargs=every2),
        replace(flex, name="ours + flex_attention + no checkpointing", checkpointing=False),
        replace(ours, name="ours + flash-attn 2", attn="flash_attention_2", needs="flash_attn"),
        replace(ours, name="ours + paged 8-bit AdamW", optim="paged_adamw_8bit", needs="cuda"),
        replace(ours, name="ours + no checkpointing", checkpointing=False),
        replace(ours, name="ours + checkpoint every 2nd layer", checkpoint_kwargs=every2),
        replace(ours, name="ours + Liger kernels (fused loss)", liger=True, needs="liger_kernel"),  # patches: last
    ]


def missing(need: str | None, cuda: bool) -> str | None:
    import importlib.util

    if need == "cuda" and not cuda:
        return "needs CUDA"
    if need in ("flash_attn", "liger_kernel", "triton") and (not cuda or importlib.util.find_spec(need) is None):
        return f"needs CUDA and the {need} package"
    return None


def synthetic_dialogues(n: int, vocab: int, seed: int = 0, max_tokens: int = 4096) -> list[list[int]]:
    """Token dialogues with ultrachat_200k's length mix: log-normal, median ~1,200 and mean ~1,400 tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=math.log(1200), sigma=0.55, size=n), 64, max_tokens).astype(int)
    return [[1, *rng.integers(3, vocab, size=int(length) - 2).tolist(), 2] for length in lengths]


def save_random_model(config_kwargs: dict, folder: Path, device: str) -> Path:
    """Random-init Mistral of the given shape, saved as safetensors (bf16) for the 4-bit loader."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(MistralConfig(**config_kwargs)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def linear_params(config) -> int:
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return L * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * config.vocab_size


def flops_per_token(config, seq: int, checkpointing: bool) -> float:
    n = linear_params(config)
    attention = 4 * config.num_hidden_layers * seq * config.hidden_size  # causal, forward + backward
    if checkpointing:
        return 6 * n + attention * 1.5
    return 4 * n + attention


def run_variant(v: Variant, model_dir: Path, data, tokenizer, args, cuda: bool) -> dict:
    import datasets
    import torch
    from trl import ModelConfig, SFTConfig, SFTTrainer

    from utils import sft

    model_args = ModelConfig(
        model_name_or_path=str(model_dir),
        dtype="bfloat16" if cuda else "float32",
        attn_implementation=v.attn,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_peft=True,
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.05,
        lora_target_modules=list(sft.MISTRAL_LINEAR_MODULES),
    )
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=v.per_device,
            gradient_accumulation_steps=v.accumulation,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            max_length=args.max_length,
            packing=v.packing,
            packing_strategy="bfd",
            activation_checkpointing=v.checkpointing,
            activation_checkpointing_kwargs=v.checkpoint_kwargs,
            optim=v.optim,
            use_liger_kernel=v.liger,
            bf16=cuda,
            use_cpu=not cuda,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            include_num_input_tokens_seen="non_padding",
            dataloader_num_workers=0,
            seed=42,
        )
        model = sft.load_model(model_args, sft.bnb_config(model_args))
        clock = StepClock(args.warmup)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_dict({"input_ids": data}),
            processing_class=tokenizer,
            peft_config=sft.lora_config(model_args),
            callbacks=[clock],
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        seconds = clock.seconds()
        tokens = clock.tokens()
        result = {
            "variant": v.name,
            "batch": f"{v.per_device}x{v.accumulation}",
            "tokens/s": tokens / seconds if seconds else float("nan"),
            "s/step": seconds / max(args.steps, 1),
            "peak alloc GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak reserved GiB": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "flops/token": flops_per_token(model.config, args.max_length, v.checkpointing),
        }
        del trainer, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return result


class StepClock(TrainerCallback):
    """Times the optimizer steps after ``warmup`` and counts the (non-padding) tokens they consumed."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step >= self.warmup:
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    def seconds(self) -> float:
        return self.marks[-1][0] - self.marks[0][0] if len(self.marks) > 1 else 0.0

    def tokens(self) -> int:
        return self.marks[-1][1] - self.marks[0][1] if len(self.marks) > 1 else 0


def main() -> int:
    import torch

    from utils.assets import TINY_MISTRAL, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU; asserts nothing about speed")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing starts")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, in alternating order")
    parser.add_argument("--max-length", type=int, default=SEQ)
    parser.add_argument("--profile", default=None, help="gpu-40gb, gpu-24gb or gpu-16gb (default: by GPU memory)")
    parser.add_argument("--only", nargs="*", help="run only variants whose name starts with these")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("error: no CUDA GPU; run with --cpu-smoke to exercise the script on the CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        shape, args.steps, args.warmup, args.max_length = dict(TINY_MISTRAL), 2, 1, 256
        name, peak = "CPU (smoke: tiny model)", None
    else:
        shape = {}  # MistralConfig defaults are Mistral-7B's dimensions
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0
    profile = args.profile or _profile_for(gib, cuda)

    tokenizer = load_tokenizer(None)
    data = synthetic_dialogues(64 if args.cpu_smoke else 600, 32000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model(shape, Path(tmp) / "mistral", "cuda" if cuda else "cpu")
        todo = variants(profile)
        if not args.cpu_smoke:
            todo.append(profile_variant(profile))
            if profile != "gpu-16gb":
                todo.append(replace(profile_variant("gpu-16gb"), name="16 GB check: gpu-16gb settings"))
        todo = [v for v in todo if not args.only or any(v.name.startswith(o) for o in args.only)]
        runnable = []
        for v in todo:
            why = missing(v.needs, cuda)
            if why:
                print(f"skipped {v.name}: {why}", flush=True)
            else:
                runnable.append(v)
        results: dict[str, list[dict]] = {v.name: [] for v in runnable}
        if runnable:
            print(f"warm-up (discarded): {runnable[0].name} ...", flush=True)
            run_variant(runnable[0], model_dir, data, tokenizer, args, cuda)
        for repeat, v in run_order(runnable, args.repeats):
            print(f"run {repeat + 1}/{args.repeats}: {v.name} ...", flush=True)
            results[v.name].append(run_variant(v, model_dir, data, tokenizer, args, cuda))
        for v in todo:
            if v.name not in results:
                rows.append({"variant": v.name, "skipped": missing(v.needs, cuda)})
                continue
            result = median_result(results[v.name])
            result["MFU"] = result["tokens/s"] * result["flops/token"] / (peak * 1e12) if peak else None
            rows.append(result)
    print_table(rows, name, profile, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "profile": profile, "rows": rows}, indent=2))
    return 0


def run_order(variants: list, repeats: int) -> list[tuple[int, object]]:
    """(repeat, variant) in the order they run: forward, then backward, then forward... so that no variant always
    runs right after the same one (warm caches and clocks favour later runs)."""
    return [(r, v) for r in range(repeats) for v in (variants if r % 2 == 0 else variants[::-1])]


def median_result(runs: list[dict]) -> dict:
    """One row from several runs of a variant: the median tokens/s (and its s/step), the largest peak memory."""
    import statistics

    ordered = sorted(runs, key=lambda r: r["tokens/s"])
    middle = ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else None
    row = dict(middle or ordered[len(ordered) // 2])
    row["tokens/s"] = statistics.median(r["tokens/s"] for r in runs)
    row["s/step"] = statistics.median(r["s/step"] for r in runs)
    row["runs"] = [round(r["tokens/s"], 1) for r in runs]
    for key in ("peak alloc GiB", "peak reserved GiB"):
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = max(values) if values else None
    return row


def _profile_for(gib: float, cuda: bool) -> str:
    from utils.hardware import GPU_PROFILES

    fitting = [p.name for p in GPU_PROFILES if gib >= p.min_gpu_memory_gib]
    return fitting[-1] if cuda and fitting else "gpu-40gb"


def profile_variant(name: str) -> Variant:
    """The settings ``utils/hardware.py`` and ``utils/sft.py`` give a GPU of this profile (Hopper/Ampere attention)."""
    from utils.hardware import PROFILES
    from utils.sft import PROFILE_TRAINING

    profile, p = PROFILES[name], PROFILE_TRAINING[name]
    kwargs = {"use_reentrant": False}
    if profile.checkpoint_every > 1:
        kwargs["every_n_layers"] = profile.checkpoint_every
    return Variant(
        f"profile {name}",
        p["per_device_train_batch_size"],
        p["gradient_accumulation_steps"],
        packing=True,
        attn="flex_attention" if name != "gpu-16gb" else "sdpa",
        checkpointing=profile.checkpoint_every > 0,
        checkpoint_kwargs=kwargs,
        optim=p.get("optim", "adamw_torch"),
        needs="triton" if name != "gpu-16gb" else None,
    )


def print_table(rows: list[dict], device: str, profile: str, args) -> None:
    print(
        f"\ndevice: {device} | profile: {profile} | length {args.max_length} | {args.steps} steps after "
        f"{args.warmup} warm-up | median of {args.repeats} runs per variant, alternating order, after a discarded "
        "warm-up run"
    )
    print(f"{'variant':38s} {'batch':>6s} {'tok/s':>9s} {'s/step':>7s} {'alloc GiB':>10s} {'resv GiB':>9s} {'MFU':>6s}")
    base = next((r for r in rows if "tokens/s" in r), None)
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:38s} skipped: {r['skipped']}")
            continue

        def fmt(value, width: int, digits: int, suffix: str = "") -> str:
            return f"{value:{width - len(suffix)}.{digits}f}{suffix}" if value is not None else f"{'-':>{width}s}"

        mfu = 100 * r["MFU"] if r["MFU"] is not None else None
        print(
            f"{r['variant']:38s} {r['batch']:>6s} {r['tokens/s']:9.0f} {r['s/step']:7.2f} "
            f"{fmt(r['peak alloc GiB'], 10, 2)} {fmt(r['peak reserved GiB'], 9, 2)} {fmt(mfu, 6, 1, '%')}"
        )
    if base:
        best = max((r for r in rows if "tokens/s" in r), key=lambda r: r["tokens/s"])
        print(f"fastest: {best['variant']}, {best['tokens/s'] / base['tokens/s']:.2f}x the baseline's tokens/s")
    check = next((r for r in rows if r["variant"].startswith("16 GB check") and "tokens/s" in r), None)
    if check and check["peak reserved GiB"] is not None:
        print(
            f"16 GB check: gpu-16gb settings peak at {check['peak reserved GiB']:.2f} GiB reserved "
            f"({'below' if check['peak reserved GiB'] < 15 else 'ABOVE'} 15 GiB)"
        )


if __name__ == "__main__":
    sys.exit(main())

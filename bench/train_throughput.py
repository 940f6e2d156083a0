"""Benchmark: QLoRA training speed of Mistral-7B with our settings against plain TRL defaults, on one GPU.

    python bench/train_throughput.py                  # on a GPU: ~10 minutes, prints one table
    python bench/train_throughput.py --cpu-smoke      # the tiny model on the CPU: runs every code path, no numbers

The model is the Mistral-7B architecture (``MistralConfig`` defaults) with random weights, built in bf16 and saved
once. Every variant is the QLoRA recipe resolved under this GPU's profile (``utils.recipe``) with the variant's
command-line overrides, and trained through ``utils.sft.trainer_for``, the path every run takes: speed and
memory do not depend on the weights' values. The data are synthetic token dialogues with an UltraChat-like length
mix.

Variants:
  baseline   plain TRL defaults: the recipe's LoRA and batch (4 x 2), no packing, sdpa, padded batches
  ours       bfd packing, padding-free, sdpa, checkpointing every layer (the settings before flex_attention)
  ours+...   one speed option at a time: flex_attention, flex_attention with checkpointing every 2nd layer or
             none (the gpu-40gb and gpu-80gb profiles), flash-attention 2, Liger kernels, paged 8-bit AdamW,
             sdpa without checkpointing or every 2nd layer
  profile    the settings utils/hardware.py picks for this GPU, untouched
  16 GB      the gpu-16gb profile's settings in bf16, and in fp16 as on a T4 (CUDA's fp16 gradient scaler rejects
             bfloat16 gradients on any GPU, so this is where a T4-only failure shows on an H100)
Each reports loss-carrying tokens/s, seconds per step, peak allocated and reserved memory, and MFU; a variant that
fails is a row with its error.

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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

from utils import CONFIGS_DIR  # noqa: E402

RECIPE = str(CONFIGS_DIR / "sft_qlora.yaml")
SEQ = 2048
SDPA_EVERY_LAYER = ["--attn_implementation", "sdpa", "--activation_checkpointing", "true"]
NO_CHECKPOINTING = ["--activation_checkpointing", "false"]
EVERY_2ND = ["--activation_checkpointing", "true", "--activation_checkpointing_kwargs", '{"every_n_layers": 2}']
FP16 = ["--dtype", "float16", "--fp16", "true", "--bf16", "false"]


@dataclass
class Variant:
    """Command-line overrides of the QLoRA recipe, resolved under this GPU's profile like any run."""

    name: str
    argv: list[str] = field(default_factory=list)
    profile: str | None = None  # another profile than this GPU's (the 16 GB checks)
    needs: str | None = None  # "cuda", "triton", "flash_attn", "liger_kernel": skipped with a reason when missing


def variants() -> list[Variant]:
    flex = ["--attn_implementation", "flex_attention"]
    return [
        Variant("baseline (TRL defaults)", ["--packing", "false", *SDPA_EVERY_LAYER]),
        Variant("ours", SDPA_EVERY_LAYER),
        Variant("ours + flex_attention", [*flex, "--activation_checkpointing", "true"], needs="triton"),
        Variant("ours + flex_attention + checkpoint every 2nd layer", [*flex, *EVERY_2ND], needs="triton"),
        Variant("ours + flex_attention + no checkpointing", [*flex, *NO_CHECKPOINTING], needs="triton"),
        Variant("ours + flash-attn 2", ["--attn_implementation", "flash_attention_2"], needs="flash_attn"),
        Variant("ours + paged 8-bit AdamW", [*SDPA_EVERY_LAYER, "--optim", "paged_adamw_8bit"], needs="cuda"),
        Variant("ours + no checkpointing", ["--attn_implementation", "sdpa", *NO_CHECKPOINTING]),
        Variant("ours + checkpoint every 2nd layer", ["--attn_implementation", "sdpa", *EVERY_2ND]),
        Variant(
            "ours + Liger kernels (fused loss)", [*SDPA_EVERY_LAYER, "--use_liger_kernel", "true"], needs="liger_kernel"
        ),
    ]


def gpu_variants(profile: str) -> list[Variant]:
    """This GPU's own profile, and the 16 GB settings in bf16 and in fp16 (a T4's precision: its CUDA grad scaler
    rejects bfloat16 gradients on any GPU, so this variant shows that class of failure here)."""
    t4 = ["--attn_implementation", "sdpa"]  # a T4 cannot run flex_attention
    return [
        Variant(f"profile {profile}"),
        Variant("16 GB check: gpu-16gb settings", t4, profile="gpu-16gb"),
        Variant("16 GB check: gpu-16gb settings, fp16 (T4)", [*t4, *FP16], profile="gpu-16gb"),
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
    """Random-init Mistral of the given shape, built directly in bf16 (a 7B in fp32 would take 29 GB) and saved as
    safetensors for the 4-bit loader."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM._from_config(MistralConfig(**config_kwargs), dtype=torch.bfloat16)
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


def run_variant(v: Variant, model_dir: Path, data, tokenizer, args, hardware, default_profile: str) -> dict:
    """Train ``v`` for warm-up + measured steps through ``utils.sft.trainer_for``, as any run does."""
    import datasets
    import torch

    from utils.hardware import choose_profile
    from utils.recipe import resolve
    from utils.sft import trainer_for

    cuda = hardware.cuda
    profile = choose_profile(v.profile or default_profile, hardware, verbose=False, model=str(model_dir))
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--config", RECIPE, "--model_name_or_path", str(model_dir), "--output_dir", out,
            "--max_steps", str(args.warmup + args.steps), "--max_length", str(args.max_length),
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no",
            "--eval_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", *v.argv,
        ]  # fmt: skip
        run_args = resolve(argv, profile, hardware).build()
        clock = StepClock(args.warmup)
        trainer = trainer_for(
            run_args, tokenizer=tokenizer, data={"train": datasets.Dataset.from_dict({"input_ids": data})}
        )
        trainer.add_callback(clock)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        seconds, tokens = clock.seconds(), clock.tokens()
        t = run_args.training
        result = {
            "variant": v.name,
            "batch": f"{t.per_device_train_batch_size}x{t.gradient_accumulation_steps}",
            "precision": "fp16" if t.fp16 else "bf16" if t.bf16 else "fp32",
            "attention": run_args.model.attn_implementation,
            "tokens/s": tokens / seconds if seconds else float("nan"),
            "s/step": seconds / max(args.steps, 1),
            "peak alloc GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak reserved GiB": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "flops/token": flops_per_token(trainer.model.config, args.max_length, t.activation_checkpointing),
        }
        del trainer
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

    from tools.tiny_base import TINY_MISTRAL
    from utils.assets import load_tokenizer
    from utils.hardware import choose_profile, detect_hardware, peak_tflops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU; asserts nothing about speed")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing starts")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, in alternating order")
    parser.add_argument("--max-length", type=int, default=SEQ)
    parser.add_argument("--profile", default=None, help="the profile of 'ours' (default: this GPU's)")
    parser.add_argument("--only", nargs="*", help="run only variants whose name starts with these")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense 16-bit peak")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    hardware = detect_hardware(check_hub=False)
    cuda = hardware.cuda and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("error: no CUDA GPU; run with --cpu-smoke to exercise the script on the CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        shape, args.steps, args.warmup, args.max_length = dict(TINY_MISTRAL), 2, 1, 256
        name, peak, profile = "CPU (smoke: tiny model)", None, "smoke"
    else:
        shape = {}  # MistralConfig defaults are Mistral-7B's dimensions
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or peak_tflops(name)

    tokenizer = load_tokenizer(None)
    data = synthetic_dialogues(64 if args.cpu_smoke else 600, 32000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_model(shape, Path(tmp) / "mistral", "cuda" if cuda else "cpu")
        tokenizer.save_pretrained(model_dir)
        if cuda:
            profile = args.profile or choose_profile("auto", hardware, verbose=False, model=str(model_dir)).name
        todo = variants() + (gpu_variants(profile) if cuda else [])
        todo = [v for v in todo if not args.only or any(v.name.startswith(o) for o in args.only)]
        runnable = [v for v in todo if not missing(v.needs, cuda)]
        for v in todo:
            if v not in runnable:
                print(f"skipped {v.name}: {missing(v.needs, cuda)}", flush=True)
        results: dict[str, list[dict]] = {v.name: [] for v in runnable}
        measure = lambda v: run_variant(v, model_dir, data, tokenizer, args, hardware, profile)  # noqa: E731
        if runnable:
            print(f"warm-up (discarded): {runnable[0].name} ...", flush=True)
            measure(runnable[0])
        for repeat, v in run_order(runnable, args.repeats):
            print(f"run {repeat + 1}/{args.repeats}: {v.name} ...", flush=True)
            try:
                results[v.name].append(measure(v))
            except Exception as exc:  # noqa: BLE001 - a failing variant (the fp16 one before its fix) is a row
                results[v.name].append({"variant": v.name, "failed": str(exc).strip().splitlines()[0][:200]})
        for v in todo:
            if v.name not in results:
                rows.append({"variant": v.name, "skipped": missing(v.needs, cuda)})
                continue
            failed = next((r for r in results[v.name] if "failed" in r), None)
            if failed:
                rows.append(failed)
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


def print_table(rows: list[dict], device: str, profile: str, args) -> None:
    print(
        f"\ndevice: {device} | profile: {profile} | length {args.max_length} | {args.steps} steps after "
        f"{args.warmup} warm-up | median of {args.repeats} runs per variant, alternating order, after a discarded "
        "warm-up run"
    )
    print(f"{'variant':50s} {'batch':>6s} {'tok/s':>9s} {'s/step':>7s} {'alloc GiB':>10s} {'resv GiB':>9s} {'MFU':>6s}")
    base = next((r for r in rows if "tokens/s" in r), None)
    for r in rows:
        if "skipped" in r or "failed" in r:
            print(f"{r['variant']:50s} {'skipped: ' + r['skipped'] if 'skipped' in r else 'FAILED: ' + r['failed']}")
            continue

        def fmt(value, width: int, digits: int, suffix: str = "") -> str:
            return f"{value:{width - len(suffix)}.{digits}f}{suffix}" if value is not None else f"{'-':>{width}s}"

        mfu = 100 * r["MFU"] if r["MFU"] is not None else None
        print(
            f"{r['variant']:50s} {r['batch']:>6s} {r['tokens/s']:9.0f} {r['s/step']:7.2f} "
            f"{fmt(r['peak alloc GiB'], 10, 2)} {fmt(r['peak reserved GiB'], 9, 2)} {fmt(mfu, 6, 1, '%')}"
        )
    if base:
        best = max((r for r in rows if "tokens/s" in r), key=lambda r: r["tokens/s"])
        print(f"fastest: {best['variant']}, {best['tokens/s'] / base['tokens/s']:.2f}x the baseline's tokens/s")
    for check in (r for r in rows if r["variant"].startswith("16 GB check") and "tokens/s" in r):
        if check["peak reserved GiB"] is not None:
            reserved = check["peak reserved GiB"]
            print(
                f"{check['variant']}: peak {reserved:.2f} GiB reserved ({'below' if reserved < 14.7 else 'ABOVE'} the "
                "14.7 GiB of a T4)"
            )


if __name__ == "__main__":
    sys.exit(main())

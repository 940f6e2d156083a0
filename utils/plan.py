"""What a run would do on a GPU, without that GPU and without loading any weights.

python -m utils.sft --config configs/sft_qlora.yaml --gpu t4 --plan [--json plan.json]    # docs/gpu_plans.md
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from utils import REPO_ROOT, scaling
from utils.hardware import SHAPES, ULTRACHAT_TOKENS, Hardware, choose_profile, peak_tflops
from utils.recipe import CLI, PROFILE, RECIPE, Settings, resolve


def checkpoint_every(values: dict) -> int:
    """Activation checkpointing as a layer interval: 0 none, 1 every layer, n every n-th."""
    if not values.get("activation_checkpointing"):
        return 0
    return int((values.get("activation_checkpointing_kwargs") or {}).get("every_n_layers", 1))


def _qlora(values: dict) -> bool:
    return bool(values["load_in_4bit"] and values["use_peft"])


def part_dtypes(values: dict) -> dict[str, str]:
    """The dtype of each part of the run, as TRL, peft and bitsandbytes set them."""
    dtype, quantized = values["dtype"], values["load_in_4bit"]
    autocast = "bfloat16" if values["bf16"] else "float16 (with a gradient scaler)" if values["fp16"] else "none"
    if _qlora(values):
        trainable = "float32 (with_additions keeps them so under fp16)" if values["fp16"] else "bfloat16 (TRL's cast)"
    elif values["use_peft"]:
        trainable = "float32 (peft upcasts adapter weights)"
    else:
        trainable = f"{dtype} (every weight; the sharding engine keeps float32 master copies)"
    return {
        "base weights": f"4-bit NF4, the rest in {dtype}" if quantized else dtype,
        "4-bit compute": dtype if quantized else "(no 4-bit layers)",
        "trainable weights": trainable,
        "autocast": autocast,
        "merge": "float16" if dtype == "float16" else "bfloat16",
        "sampling": dtype,
    }


def memory_gib(values: dict, world: int) -> tuple[float, str]:
    """Estimated peak GPU memory per GPU and how it was estimated."""
    batch, length = values["per_device_train_batch_size"], values["max_length"]
    if not _qlora(values):
        strategy = "zero3" if world > 1 else "ddp"
        total = scaling.estimate(strategy, world, 0, batch, length).total
        return total, f"scaling.estimate: full fine-tune, {strategy} on {world} GPU(s)"
    every = checkpoint_every(values)
    estimate = sum(scaling.qlora_memory(every, batch, length, values["lora_r"]).values())
    reference = sum(scaling.qlora_memory(every).values())  # the measured setting: 4 x 2048 tokens, r 16
    measured = scaling.measured_qlora_gib()[every]
    how = f"scaling.qlora_memory, calibrated on the {measured} GiB measured on an H200 at 4 x 2048 tokens"
    return estimate * measured / reference, how


def epoch_hours(values: dict, hw: Hardware, world: int) -> tuple[float | None, str]:
    """Hours for one epoch of ultrachat_200k (QLoRA only): the H200's measured tokens/s for these settings, in
    proportion to peak TFLOPS alone (not bandwidth or size) and scaled perfectly over GPUs; the basis names both."""
    if not hw.cuda or not _qlora(values):
        return None, "no estimate (QLoRA on a GPU only)"
    ref = scaling.h200_measurements()
    every, attn = checkpoint_every(values), values["attn_implementation"]
    attn = "flex_attention" if attn == "flash_attention_2" else attn  # both skip the blocks between dialogues
    rows = [r for r in ref["rows"] if r["packed"] and r["checkpoint_every"] == every]
    row = next((r for r in rows if r["attn"] == attn), rows[0] if rows else None)
    peak = peak_tflops(hw.gpu_name or "")
    if row is None or not peak:
        return None, "no estimate (no measurement for these settings, or an unknown GPU)"
    tok_s = row["tokens_per_second"] * peak / ref["peak_tflops"] * world
    assumes = ["speed in proportion to peak TFLOPS"]
    if peak == ref["peak_tflops"] and ref["device"].lower() not in (hw.gpu_name or "").lower():
        assumes[0] += f" alone (this GPU's peak is the {ref['device']}'s, so its estimate is the H200's measurement)"
    if world > 1:
        assumes.append(f"perfect scaling over {world} GPUs ({world} x one GPU's speed)")
    basis = (
        f"estimate: the H200's {row['tokens_per_second']:,} tokens/s for '{row['variant']}' x {peak:.0f}/"
        f"{ref['peak_tflops']:.0f} peak TFLOPS x {world} GPU(s) = {tok_s:,.0f} tokens/s; assumes "
        + " and ".join(assumes)
    )
    return ULTRACHAT_TOKENS / tok_s / 3600, basis


def plan(settings: Settings, hw: Hardware) -> dict:
    """The plan as data: ``{"profile", "settings": {FIELD: {"value", "from"}}, "hardware", "parts", "estimates"}``."""
    v, world = settings.values, settings.world_size
    gib, how = memory_gib(v, world)
    hours, basis = epoch_hours(v, hw, world)
    return {
        **settings.to_json(),
        "world_size": world,
        "hardware": hw.summary(),
        "reasons": list(settings.profile.reasons),
        "parts": part_dtypes(v),
        "estimates": {
            "memory_gib": round(gib, 1),
            "memory_basis": how,
            "gpu_memory_gib": hw.gpu_memory_gib if hw.cuda else None,
            "fits": (gib <= hw.gpu_memory_gib) if hw.cuda else None,
            "epoch_tokens": ULTRACHAT_TOKENS,
            "epoch_hours": round(hours, 1) if hours else None,
            "epoch_basis": basis,
        },
        "notes": settings.notes,
    }


def print_plan(result: dict) -> None:
    """The plan as a reader wants it: what changed and why, the dtypes, the batch, memory and time."""
    s, e = result["settings"], result["estimates"]
    print(f"Plan for {result['hardware']}: profile {result['profile']}")
    for reason in result["reasons"]:
        print(f"  {reason}")
    changed = {k: x for k, x in s.items() if x["from"] in (PROFILE, CLI)}
    print("Settings the profile or the command line set:")
    width = max((len(k) for k in changed), default=10)
    for name, x in changed.items():
        print(f"  {name:<{width}}  {str(x['value']):<34} {x['from']}")
    from_recipe = sum(x["from"] == RECIPE for x in s.values())
    print(
        f"  ... and {from_recipe} settings from the recipe file as written; the rest are TRL's defaults (--json: all)"
    )
    print("Dtypes:")
    for part, dtype in result["parts"].items():
        print(f"  {part:<18} {dtype}")
    per, acc = s["per_device_train_batch_size"]["value"], s["gradient_accumulation_steps"]["value"]
    world = result["world_size"]
    print(
        f"Batch: {per} per device x {acc} accumulation x {world} process(es) = {per * acc * world} sequences of "
        f"{s['max_length']['value']} tokens per optimizer step"
    )
    if e["gpu_memory_gib"]:
        verdict = "fits" if e["fits"] else "does NOT fit"
        print(f"Memory: ~{e['memory_gib']} GiB per GPU of {e['gpu_memory_gib']} GiB: {verdict} ({e['memory_basis']})")
    if e["epoch_hours"]:
        print(f"One epoch of ultrachat_200k (~{e['epoch_tokens'] / 1e6:.0f}M tokens): ~{e['epoch_hours']:,} hours")
        how, _, assumed = e["epoch_basis"].partition("; assumes ")
        print(f"  ({how})" + (f"\n  assumes {assumed}" if assumed else ""))


def plan_in_child(argv: list[str], gpu: str | None = None) -> dict:
    """``plan`` computed by ``python -m utils.sft ... --plan`` in a child process, which imports TRL (and so
    bitsandbytes, which initialises CUDA) instead of this one: notebook 03's ``notebook_launcher`` can still fork."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        gpu_args = ["--gpu", gpu] if gpu else []
        command = [sys.executable, "-m", "utils.sft", *argv, "--plan", "--json", str(out), *gpu_args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"the plan failed (exit {done.returncode})")
        return json.loads(out.read_text())


def value(result: dict, name: str) -> Any:
    """One setting's value from a plan."""
    return result["settings"][name]["value"]


# --- every GPU the collection plans for ------------------------------------------------------------------------------
def shape_plans(config: str = "configs/sft_qlora.yaml") -> dict[str, dict]:
    """The plan of ``config`` for every shape in utils.hardware.SHAPES (resolved in this process)."""
    plans = {}
    for name, gpu in SHAPES.items():
        hw = gpu.hardware()
        with contextlib.redirect_stdout(io.StringIO()):
            settings = resolve(["--config", config], choose_profile("auto", hw, verbose=False), hw, gpu.count)
        plans[name] = plan(settings, hw)
    return plans


if __name__ == "__main__":  # the command that wrote docs/gpu_plans.md moved with the other maintenance tools
    print("error: python -m utils.plan moved: run python -m tools.gpu_plans", file=sys.stderr)
    sys.exit(2)

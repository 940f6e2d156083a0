"""What machine is this, and which profile should the notebooks use on it?

python -m utils.hardware                 # this machine
python -m utils.hardware --gpu t4        # a Colab T4, planned from here (``SHAPES`` below lists them)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

# torch.cuda.is_available() asks the driver through cuInit unless this is set, and a process that did cannot fork
# CUDA workers any more (accelerate's notebook_launcher on Kaggle's 2 x T4). NVML answers without that side effect.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

BASE_MODEL_ID = "mistralai/Mistral-7B-v0.1"
HUB_DATASET = "HuggingFaceH4/ultrachat_200k"
SAMPLE_DATASET = "data/sample/ultrachat_200k"
# ultrachat_200k's train_sft as the card packed it, in rows of 2,048 tokens: the card's stop at step 272 (x 512 rows)
# and two other published runs pin 139,264 to 139,648 rows (docs/card_era.md); their middle is the one reference here.
ULTRACHAT_PACKED_ROWS = 139_456
ULTRACHAT_TOKENS = ULTRACHAT_PACKED_ROWS * 2048  # ~285.6M


@dataclass(frozen=True)
class Hardware:
    """The facts a profile is chosen from."""

    cuda: bool
    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_memory_gib: float = 0.0
    compute_capability: tuple[int, int] | None = None
    bf16: bool = False
    flash_attn: bool = False
    platform: str = "local"  # "colab", "kaggle" or "local"
    hub: bool = False
    triton: bool = False  # flex_attention compiles its kernels with Triton ...
    compiler: bool = False  # ... which needs a C compiler at run time

    def summary(self) -> str:
        """One line: GPU (or CPU), platform and Hub reachability."""
        gpu = "no CUDA GPU"
        if self.cuda:
            cc, bf16 = ".".join(map(str, self.compute_capability or ())), "yes" if self.bf16 else "no"
            gpu = f"{self.gpu_count}x {self.gpu_name} ({self.gpu_memory_gib:.0f} GiB, sm {cc}, bf16={bf16})"
        return f"{gpu}; platform {self.platform}; Hub {'reachable' if self.hub else 'unreachable'}"


@dataclass(frozen=True)
class Profile:
    """Everything that changes with the hardware. ``smoke`` runs the embedded default on a CPU."""

    name: str
    description: str
    model_id: str | None  # a Hub id or a local folder; None: the embedded tiny Mistral and the shipped tokenizer
    dataset: str  # a Hub id or a local path understood by utils.prepare_data
    compute_dtype: str  # "bfloat16", "float16" or "float32"
    attn_implementation: str  # "flash_attention_2", "flex_attention", "sdpa" or "eager"
    min_gpu_memory_gib: float = 0.0
    checkpoint_every: int = 1  # activation checkpointing on every n-th decoder layer; 0: none
    training: dict[str, Any] = field(default_factory=dict)  # batch and, for smoke, the run's scale
    reasons: tuple[str, ...] = ()  # why attention and checkpointing were chosen, for the printed line

    @property
    def is_smoke(self) -> bool:
        return self.name == "smoke"

    def settings(self) -> dict[str, Any]:
        """Every setting this profile gives a run, by its TRL/transformers field name."""
        values: dict[str, Any] = {
            "dtype": self.compute_dtype,
            "attn_implementation": self.attn_implementation,
            "bf16": self.compute_dtype == "bfloat16",
            "fp16": self.compute_dtype == "float16",
            "activation_checkpointing": self.checkpoint_every > 0,
            **self.training,
        }
        if self.checkpoint_every > 1:
            values["activation_checkpointing_kwargs"] = {"every_n_layers": self.checkpoint_every}
        if self.compute_dtype == "float32":
            values["use_cpu"] = True
        return values


# The embedded default stands in for the 7B model and 200k dialogues, so it also sets the run's scale: short
# sequences, one dialogue-packed row per step, two epochs, a tiny model's learning rate. With these the tiny base
# learns the template and the pirate's voice in every seed tried, on both CPU paths (bench/tiny_sft_check.py).
SMOKE = Profile(
    name="smoke",
    description="embedded default: real Mistral tokenizer, tiny pretrained Mistral, shipped sample dialogues",
    model_id=None,
    dataset=SAMPLE_DATASET,
    compute_dtype="float32",
    attn_implementation="sdpa",
    checkpoint_every=0,
    training=dict(
        per_device_train_batch_size=1,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=1,
        global_batch_size=None,
        max_length=256,
        logging_steps=1,
        save_steps=50,
        num_train_epochs=2,
        learning_rate=5e-3,
        packing_strategy="bfd",
        report_to=[],
    ),
)
# Every GPU profile trains 4 x 2 sequences of 2,048 tokens per optimizer step and GPU, as the recipe does; memory is
# the business of activation checkpointing (docs/benchmarks.md, "QLoRA on an H200"). Smallest first: `auto` takes the
# last one whose needs the GPU meets.
GPU_TRAINING: dict[str, Any] = dict(
    per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=2, packing_strategy="bfd"
)
GPU_PROFILES = tuple(
    Profile(name, description, BASE_MODEL_ID, HUB_DATASET, "bfloat16", "sdpa", gib, every, GPU_TRAINING)
    for name, description, gib, every in (
        ("gpu-16gb", "16 GB class (T4, V100, RTX 4080): checkpointing every layer", 14.0, 1),
        ("gpu-24gb", "24 GB class (L4, A10, RTX 3090/4090): checkpointing every layer", 22.0, 1),
        ("gpu-40gb", "40 GB class (A100 40GB, L40S, A6000): checkpointing every 2nd layer", 38.0, 2),
        ("gpu-80gb", "80 GB and more (A100/H100 80GB, H200): no activation checkpointing", 75.0, 0),
    )
)
PROFILES = {p.name: p for p in (SMOKE, *GPU_PROFILES)}


@dataclass(frozen=True)
class GpuShape:
    """A GPU an instructor plans for without having it (``--gpu t4``): memory is what torch reports (GiB)."""

    name: str  # the device name torch reports
    memory_gib: float
    compute_capability: tuple[int, int]
    count: int = 1
    platform: str = "local"

    def hardware(self) -> Hardware:
        """With the Hub and Triton with a C compiler (as on Colab, Kaggle, CUDA images); flash-attn not assumed."""
        cc, facts = self.compute_capability, dict(platform=self.platform, hub=True, triton=True, compiler=True)
        return Hardware(True, self.name, self.count, self.memory_gib, cc, bf16=cc >= (8, 0), **facts)


# Dense 16-bit tensor TFLOPS from the vendors' data sheets, by name fragment (fp16 on GPUs without bf16; fp32
# accumulation on GeForce cards).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "T4": 65.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}
SHAPES: dict[str, GpuShape] = {
    "t4": GpuShape("Tesla T4", 14.7, (7, 5), platform="colab"),
    "2xt4": GpuShape("Tesla T4", 14.7, (7, 5), count=2, platform="kaggle"),
    "l4": GpuShape("NVIDIA L4", 22.5, (8, 9)),
    "a10g": GpuShape("NVIDIA A10G", 22.5, (8, 6)),
    "rtx4090": GpuShape("NVIDIA GeForce RTX 4090", 23.6, (8, 9)),
    "a100-40gb": GpuShape("NVIDIA A100-SXM4-40GB", 39.4, (8, 0)),
    "a100-80gb": GpuShape("NVIDIA A100-SXM4-80GB", 79.2, (8, 0)),
    "h100": GpuShape("NVIDIA H100 80GB HBM3", 79.1, (9, 0)),
    "h200": GpuShape("NVIDIA H200", 139.8, (9, 0)),
}


def shape(name: str) -> GpuShape:
    """The shape called ``name`` (case-insensitive), or N of them (``16xa100-80gb``; the card trained on 16)."""
    key = name.lower()
    if key in SHAPES:
        return SHAPES[key]
    count, _, single = key.partition("x")
    if count.isascii() and count.isdigit() and single in SHAPES:
        if not 1 <= int(count) <= 1024:
            raise ValueError(f"GPU {name!r}: the count must be 1 to 1024")
        return replace(SHAPES[single], count=int(count))
    raise ValueError(f"unknown GPU {name!r}; choose one of: {', '.join(SHAPES)} (or NxGPU, e.g. 8xh100)")


def peak_tflops(gpu_name: str) -> float | None:
    """Dense 16-bit peak of a GPU from its device name, or None. Longer fragments first: an "A100" is no "A10"."""
    fragments = sorted(PEAK_TFLOPS, key=len, reverse=True)
    return next((PEAK_TFLOPS[f] for f in fragments if f.lower() in gpu_name.lower()), None)


def detect_platform() -> str:
    """``colab``, ``kaggle`` or ``local``, from the environment variables those services set."""
    if "COLAB_RELEASE_TAG" in os.environ or "google.colab" in sys.modules:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ:
        return "kaggle"
    return "local"


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face Hub answers a TCP connect within ``timeout`` seconds and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def c_compiler() -> str | None:
    """The C compiler Triton would call (``$CC``, else cc, gcc or clang on the PATH), or None."""
    return next((name for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name and shutil.which(name)), None)


_GPU_QUERY = """import json, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps([p.name, torch.cuda.device_count(), p.total_memory / 2**30, p.major, p.minor]))"""


@lru_cache(maxsize=2)
def detect_hardware(check_hub: bool = True) -> Hardware:
    """The GPU, the platform, the tools flex_attention needs and, unless ``check_hub`` is False, the Hub."""
    import torch

    facts = dict(
        platform=detect_platform(),
        hub=hub_reachable() if check_hub else False,
        triton=importlib.util.find_spec("triton") is not None,
        compiler=c_compiler() is not None,
    )
    flash_attn = importlib.util.find_spec("flash_attn") is not None
    if not torch.cuda.is_available():  # NVML-based (see PYTORCH_NVML_BASED_CUDA_CHECK above): CUDA stays untouched
        return Hardware(cuda=False, flash_attn=flash_attn, **facts)
    # GPU 0, read in a child process: one that initialised CUDA could no longer fork notebook_launcher's processes
    out = subprocess.run([sys.executable, "-c", _GPU_QUERY], capture_output=True, text=True, check=True)
    name, count, gib, *cc = json.loads(out.stdout.strip().splitlines()[-1])
    ampere = tuple(cc) >= (8, 0)
    return Hardware(True, name, count, gib, tuple(cc), bf16=ampere, flash_attn=flash_attn and ampere, **facts)


def local_model(model: str | None) -> str | None:
    """``model`` if it loads offline (a folder with ``config.json``, or a Hub id in the Hugging Face cache), or None."""
    if model and (Path(model) / "config.json").is_file():
        return model
    if not model or model.count("/") != 1 or Path(model).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        return model if isinstance(try_to_load_from_cache(model, "config.json"), str) else None
    except Exception:  # noqa: BLE001 - an unreadable cache is the same as none
        return None


def choose_profile(
    requested: str = "auto", hardware: Hardware | None = None, verbose: bool = True, model: str | None = None
) -> Profile:
    """Resolve ``requested`` ("auto" or a profile name) and print the choice with its reason. ``model`` (a folder or
    Hub id to train instead of Mistral-7B) on disk gets a GPU profile even without the Hub."""
    if requested != "auto" and requested not in PROFILES:
        raise ValueError(f"unknown profile {requested!r}; choose one of: auto, {', '.join(PROFILES)}")
    hw = hardware or detect_hardware(check_hub=requested != "smoke")
    profile, reason = _pick(requested, hw, model)
    if verbose:
        why = "; ".join(profile.reasons)
        print(f"Profile: {profile.name} — {reason} [{hw.summary()}]" + (f"\n  {why}" if why else ""))
    return profile


def _pick(requested: str, hw: Hardware, model: str | None) -> tuple[Profile, str]:
    if requested == "smoke":
        return SMOKE, "asked for explicitly"
    if not hw.cuda:
        return SMOKE, "no CUDA GPU, so the embedded default runs on the CPU"
    wanted = model or BASE_MODEL_ID
    local = local_model(wanted)
    if local is None and not hw.hub:
        return SMOKE, (
            f"the Hugging Face Hub is unreachable and {wanted} is not on disk (set MODEL to a local "
            "folder), so the embedded default is used"
        )
    fitting = [p for p in GPU_PROFILES if hw.gpu_memory_gib >= p.min_gpu_memory_gib]
    if requested == "auto" and not fitting:
        raise RuntimeError(
            f"{hw.gpu_name} has {hw.gpu_memory_gib:.1f} GiB; QLoRA of a 7B model at length 2048 needs a 16 GB "
            "GPU. Use a larger GPU (Colab T4 or better) or PROFILE='smoke' to run the embedded default."
        )
    profile = fitting[-1] if requested == "auto" else PROFILES[requested]
    if profile not in fitting:
        raise RuntimeError(
            f"profile {requested!r} needs {profile.min_gpu_memory_gib:.0f} GiB of GPU memory; this "
            f"{hw.gpu_name} has {hw.gpu_memory_gib:.0f} GiB. Use PROFILE='auto' or a smaller profile."
        )
    reason = "asked for explicitly"
    if requested == "auto":
        reason = f"{hw.gpu_memory_gib:.0f} GiB GPU fits {profile.description}"
    source = {"model_id": local or wanted}
    if hw.hub:
        reason += f"; {local or wanted} {'from disk' if local else 'from the Hub'}"
    else:
        source["dataset"] = SAMPLE_DATASET
        reason += f"; the Hub is unreachable: {local} from disk, the shipped sample dialogues as data"
    dtype = profile.compute_dtype if hw.bf16 else "float16"
    attn, why = choose_attention(hw, dtype)
    every = profile.checkpoint_every
    checkpointing = {0: "no activation checkpointing", 1: "activation checkpointing on every layer"}.get(
        every, f"activation checkpointing on every {every}nd layer"
    )
    chosen = replace(profile, **source, compute_dtype=dtype, attn_implementation=attn, reasons=(why, checkpointing))
    return chosen, reason


def choose_attention(hw: Hardware, dtype: str) -> tuple[str, str]:
    """The attention kernel for packed, padding-free batches, and why: flash-attention 2 where installed (sm80+,
    16-bit); else flex_attention (it skips the masked blocks between packed dialogues) where it can run; else sdpa."""
    if hw.flash_attn and dtype == "bfloat16":
        return "flash_attention_2", "flash-attn 2 is installed"
    if problem := attention_problem("flex_attention", hw):
        return "sdpa", f"sdpa: {problem}"
    cc = hw.compute_capability
    return "flex_attention", f"flex_attention on sm {cc[0]}{cc[1]}: skips the blocks between packed dialogues"


def attention_problem(attn: str, hw: Hardware) -> str | None:
    """Why ``attn`` cannot run on ``hw``, or None. flex_attention's Triton kernels are written for sm80+ (their tiles
    need more shared memory than a T4's 64 KB per block), and Triton compiles a small C launcher when it first runs."""
    if attn == "flash_attention_2" and not hw.flash_attn:
        return "flash_attention_2 needs the flash_attn package and a GPU of compute capability 8.0+"
    if attn != "flex_attention" or not hw.cuda:
        return None
    cc = hw.compute_capability or (0, 0)
    if cc < (8, 0):
        return f"flex_attention's Triton kernels need compute capability 8.0+, this GPU is {cc[0]}.{cc[1]}"
    if not hw.triton:
        return "flex_attention needs Triton, which is not installed"
    if not hw.compiler:
        return "flex_attention's Triton kernels need a C compiler (cc, gcc or clang), none was found"
    return None


def launcher_problems() -> list[str]:
    """What in this process would stop ``accelerate.notebook_launcher`` from forking training processes."""
    import torch

    problems = []
    if "bitsandbytes" in sys.modules:
        problems.append("bitsandbytes is imported (it initialises CUDA on import; import it inside the function)")
    if torch.cuda.is_initialized():
        problems.append("CUDA is initialised (something ran on the GPU before the launcher)")
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        problems.append("PYTORCH_NVML_BASED_CUDA_CHECK is not 1 (torch.cuda.is_available() then initialises CUDA)")
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.hardware", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", nargs="?", default="auto", help="auto, or a profile name")
    parser.add_argument("--gpu", default=None, help="plan for this GPU instead of this machine (utils.hardware.SHAPES)")
    args = parser.parse_args(argv)
    try:
        profile = choose_profile(args.profile, None if args.gpu is None else shape(args.gpu).hardware())
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, value in profile.settings().items():
        print(f"  {name:30s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPUs the collection plans for, described well enough to choose a profile without having one.

``python -m utils.hardware --gpu t4`` and ``python -m utils.sft --config FILE --gpu t4 --plan`` read these shapes:
an instructor prepares a workshop for the room's GPUs on a laptop.

Memory is what ``torch.cuda.get_device_properties(0).total_memory`` reports (GiB, a little under the GB on the box);
peak TFLOPS are the dense 16-bit tensor-core figures of the vendors' data sheets (fp16 on a T4, bf16 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from utils.hardware import Hardware


@dataclass(frozen=True)
class GpuShape:
    """One GPU model as the profile choice sees it, and how many of them a machine has."""

    name: str  # the device name torch reports
    memory_gib: float
    compute_capability: tuple[int, int]
    count: int = 1
    platform: str = "local"

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def peak_tflops(self) -> float:
        return peak_tflops(self.name) or 0.0

    def hardware(self) -> Hardware:
        """The ``Hardware`` facts of a machine with this GPU, the Hub reachable and Triton with a C compiler (as on
        Colab, Kaggle and the usual CUDA images); flash-attn is not assumed installed."""
        return Hardware(
            cuda=True,
            gpu_name=self.name,
            gpu_count=self.count,
            gpu_memory_gib=self.memory_gib,
            compute_capability=self.compute_capability,
            bf16=self.bf16,
            flash_attn=False,
            platform=self.platform,
            hub=True,
            triton=True,
            compiler=True,
        )


# Dense 16-bit tensor TFLOPS by name fragment (fp16 on GPUs without bf16; fp32 accumulation on GeForce cards).
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
    """The shape called ``name`` (case-insensitive), or ``N x`` one of them (``16xa100-80gb``: the card's 16 GPUs);
    ValueError naming the known ones otherwise."""
    key = name.lower()
    if key in SHAPES:
        return SHAPES[key]
    count, _, single = key.partition("x")
    if count.isdigit() and int(count) >= 1 and single in SHAPES:
        return replace(SHAPES[single], count=int(count))
    raise ValueError(f"unknown GPU {name!r}; choose one of: {', '.join(SHAPES)} (or NxGPU, e.g. 8xh100)")


def peak_tflops(gpu_name: str) -> float | None:
    """Dense 16-bit peak of a GPU from its device name, or None. Longer fragments are tried first, so that an
    "A100" is not taken for an "A10" nor an "L40S" for an "L4"."""
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if fragment.lower() in gpu_name.lower():
            return PEAK_TFLOPS[fragment]
    return None

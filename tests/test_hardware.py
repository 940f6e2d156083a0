"""Profile choice from the hardware facts."""

import pytest

from utils.hardware import Hardware, choose_profile

CPU = Hardware(cuda=False, hub=True)


def gpu(name, gib, cc, bf16, hub=True, flash=False):
    return Hardware(cuda=True, gpu_name=name, gpu_count=1, gpu_memory_gib=gib, compute_capability=cc, bf16=bf16,
                    hub=hub, flash_attn=flash)


@pytest.mark.parametrize("hw, name, dtype, attn", [
    (CPU, "smoke", "float32", "sdpa"),
    (gpu("Tesla T4", 15.0, (7, 5), False, hub=False), "smoke", "float32", "sdpa"),
    (gpu("Tesla T4", 15.0, (7, 5), False), "gpu-16gb", "float16", "sdpa"),
    (gpu("NVIDIA L4", 22.5, (8, 9), True), "gpu-24gb", "bfloat16", "sdpa"),
    (gpu("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), True, flash=True), "gpu-40gb", "bfloat16", "flash_attention_2"),
    (gpu("Tesla V100-SXM2-32GB", 31.7, (7, 0), False), "gpu-24gb", "float16", "sdpa"),
])
def test_auto_profile(hw, name, dtype, attn, capsys):
    profile = choose_profile("auto", hw)
    assert (profile.name, profile.compute_dtype, profile.attn_implementation) == (name, dtype, attn)
    line = capsys.readouterr().out
    assert line.startswith(f"Profile: {name} — ") and line.count("\n") == 1


def test_smoke_reason_names_the_missing_gpu(capsys):
    choose_profile("auto", CPU)
    assert "no CUDA GPU, so the embedded default runs on the CPU" in capsys.readouterr().out


def test_too_small_gpu_says_what_to_change():
    with pytest.raises(RuntimeError, match="needs a 16 GB GPU.*PROFILE='smoke'"):
        choose_profile("auto", gpu("GeForce GTX 1650", 3.8, (7, 5), False))


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError, match="unknown profile 'gpu-1tb'"):
        choose_profile("gpu-1tb", CPU)

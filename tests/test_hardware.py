"""Profile choice from the hardware facts."""

import pytest

from utils.hardware import Hardware, choose_profile

CPU = Hardware(cuda=False, hub=True)


def gpu(name, gib, cc, bf16, hub=True, flash=False, compiler=True):
    return Hardware(
        cuda=True,
        gpu_name=name,
        gpu_count=1,
        gpu_memory_gib=gib,
        compute_capability=cc,
        bf16=bf16,
        hub=hub,
        flash_attn=flash,
        triton=True,
        compiler=compiler,
    )


@pytest.mark.parametrize(
    "hw, name, dtype, attn, every",
    [
        (CPU, "smoke", "float32", "sdpa", 0),
        (gpu("Tesla T4", 15.0, (7, 5), False, hub=False), "smoke", "float32", "sdpa", 0),
        (gpu("Tesla T4", 15.0, (7, 5), False), "gpu-16gb", "float16", "sdpa", 1),
        (gpu("NVIDIA L4", 22.5, (8, 9), True), "gpu-24gb", "bfloat16", "flex_attention", 1),
        (gpu("NVIDIA A100-SXM4-40GB", 39.4, (8, 0), True), "gpu-40gb", "bfloat16", "flex_attention", 2),
        (gpu("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), True, flash=True), "gpu-80gb", "bfloat16", "flash_attention_2", 0),
        (gpu("NVIDIA H200", 139.8, (9, 0), True), "gpu-80gb", "bfloat16", "flex_attention", 0),
        (gpu("Tesla V100-SXM2-32GB", 31.7, (7, 0), False), "gpu-24gb", "float16", "sdpa", 1),
    ],
)
def test_auto_profile(hw, name, dtype, attn, every, capsys):
    profile = choose_profile("auto", hw)
    assert (profile.name, profile.compute_dtype, profile.attn_implementation) == (name, dtype, attn)
    assert profile.checkpoint_every == every
    out = capsys.readouterr().out
    assert out.startswith(f"Profile: {name} — ") and out.count("\n") == (1 if name == "smoke" else 2)


def test_t4_falls_back_to_sdpa_with_a_reason(capsys):
    choose_profile("auto", gpu("Tesla T4", 15.0, (7, 5), False))
    assert (
        "sdpa: flex_attention's Triton kernels need compute capability 8.0+, this GPU is 7.5" in capsys.readouterr().out
    )


def test_flex_attention_needs_a_c_compiler_at_run_time(capsys):
    """Triton compiles a C launcher the first time a kernel runs: without cc/gcc/clang, flex_attention would fail
    at the first step, so the profile keeps sdpa and says why."""
    profile = choose_profile("auto", gpu("NVIDIA L4", 22.5, (8, 9), True, compiler=False))
    assert profile.attn_implementation == "sdpa"
    assert "sdpa: flex_attention's Triton kernels need a C compiler (cc, gcc or clang), none was found" in (
        capsys.readouterr().out
    )


def test_the_compiler_is_looked_up_on_the_path(monkeypatch):
    from utils import hardware

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    assert hardware.c_compiler() is None
    monkeypatch.setenv("CC", "/bin/sh")  # any executable named by $CC
    assert hardware.c_compiler() == "/bin/sh"


def test_a_local_model_gets_the_gpu_profile_without_the_hub(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    profile = choose_profile("auto", gpu("NVIDIA H100 80GB HBM3", 79.1, (9, 0), True, hub=False), model=str(tmp_path))
    assert profile.name == "gpu-80gb" and profile.model_id == str(tmp_path)
    assert profile.dataset == "data/sample/ultrachat_200k"
    assert (
        f"the Hub is unreachable: {tmp_path} from disk, the shipped sample dialogues as data" in capsys.readouterr().out
    )


def test_no_hub_and_no_local_model_says_which_case_applied(tmp_path, capsys):
    profile = choose_profile("auto", gpu("NVIDIA L4", 22.5, (8, 9), True, hub=False), model=str(tmp_path / "none"))
    assert profile.name == "smoke"
    assert "the Hugging Face Hub is unreachable and " in capsys.readouterr().out


def test_a_cached_hub_model_counts_as_local(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    profile = choose_profile("auto", gpu("NVIDIA L4", 22.5, (8, 9), True, hub=False), verbose=False)
    assert profile.name == "gpu-24gb" and profile.model_id == "mistralai/Mistral-7B-v0.1"


def test_smoke_reason_names_the_missing_gpu(capsys):
    choose_profile("auto", CPU)
    assert "no CUDA GPU, so the embedded default runs on the CPU" in capsys.readouterr().out


def test_too_small_gpu_says_what_to_change():
    with pytest.raises(RuntimeError, match="needs a 16 GB GPU.*PROFILE='smoke'"):
        choose_profile("auto", gpu("GeForce GTX 1650", 3.8, (7, 5), False))


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError, match="unknown profile 'gpu-1tb'"):
        choose_profile("gpu-1tb", CPU)

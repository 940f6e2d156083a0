"""Helpers several test files share (importable as ``helpers``: pytest puts tests/ on the path)."""

from utils import REPO_ROOT

RECIPE = str(REPO_ROOT / "configs" / "sft_qlora.yaml")


def smoke_argv(out, *extra, steps: int = 4, save: int = 2) -> list[str]:
    """``python -m utils.sft`` arguments: a smoke run of the QLoRA recipe into ``out``, without merge or evaluation."""
    flags = ["--max_steps", str(steps), "--save_steps", str(save), "--merge", "false", "--eval_strategy", "no"]
    return ["--config", RECIPE, "--profile", "smoke", "--output_dir", str(out), *flags, *extra]


CPU_PATHS = REPO_ROOT / "tools" / "cpu_paths"


def cpu_path_env(env: dict, avx512bf16: bool) -> dict:
    """``env`` for a process whose bitsandbytes believes the CPU has AVX512-BF16 (or has not), whatever this CPU has
    (``tools/cpu_paths/sitecustomize.py``)."""
    import os

    path = os.pathsep.join(p for p in (str(CPU_PATHS), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "MISTRAL_SFT_TEST_AVX512BF16": "1" if avx512bf16 else "0"}

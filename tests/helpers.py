"""Helpers several test files share (importable as ``helpers``: pytest puts tests/ on the path)."""

from utils import REPO_ROOT

RECIPE = str(REPO_ROOT / "configs" / "sft_qlora.yaml")


def smoke_argv(out, *extra, steps: int = 4, save: int = 2) -> list[str]:
    """``python -m utils.sft`` arguments: a smoke run of the QLoRA recipe into ``out``, without merge or evaluation."""
    flags = ["--max_steps", str(steps), "--save_steps", str(save), "--merge", "false", "--eval_strategy", "no"]
    return ["--config", RECIPE, "--profile", "smoke", "--output_dir", str(out), *flags, *extra]

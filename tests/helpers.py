"""Helpers several test files share (importable as ``helpers``: pytest puts tests/ on the path)."""

import contextlib

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


@contextlib.contextmanager
def read_only(folder):
    """``folder`` made read-only as a Kaggle input or a read-only mount is: by a read-only bind mount as root (root
    writes through file modes), by its mode otherwise. Yields the reason a write then fails with."""
    import os
    import subprocess

    import pytest

    folder = str(folder)
    if os.geteuid() != 0:
        folders = [folder] + [os.path.join(d, n) for d, names, _ in os.walk(folder) for n in names]
        for f in folders:
            os.chmod(f, 0o555)
        try:
            yield "Permission denied"
        finally:
            for f in folders:
                os.chmod(f, 0o755)
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", folder], capture_output=True).returncode:
        if mounted:
            subprocess.run(["umount", folder])
        pytest.skip("root without mount: no way to make a folder read-only here")
    try:
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", folder], check=True)


def try_this_items(notebook) -> tuple[list[tuple[str, str]], list[str]]:
    """A notebook's Try this items, as written in backticks: (parameter assignments as (name, value), commands)."""
    import re

    import nbformat

    text = next(c.source for c in nbformat.read(notebook, as_version=4).cells if "## Try this" in c.source)
    params = re.findall(r"`([A-Z_]+) = ([^`]+)`", text)
    commands = re.findall(r"`((?:python -m|torchrun) [^`]+)`", text)
    return params, commands


def loss_halved(losses: list[float]) -> bool:
    """The training loss at least halved (``utils.tiny_world.loss_ends``); False when too few losses were logged."""
    from utils.tiny_world import loss_ends

    ends = loss_ends(losses)
    return ends is not None and ends[1] <= 0.5 * ends[0]

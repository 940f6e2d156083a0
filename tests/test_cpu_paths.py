"""bitsandbytes' two CPU paths. On a CPU with AVX512-BF16 (AMD Zen 4/5, Intel Sapphire Rapids and newer) it repacks
4-bit weights at their first forward in eval mode, unless told not to (``utils.model.keep_standard_4bit_layout``);
on other CPUs it never does. Each test forces the path it needs, so both run on any machine."""

import json
import subprocess
import sys

import pytest
from helpers import cpu_path_env, smoke_argv

from utils import REPO_ROOT

KERNELS_WARNING = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you "
    "already `pip install kernels` and the kernels >= 0.11.1"
)


def test_the_kernels_fetch_warning_is_not_printed_and_other_warnings_are(command_env):
    code = (
        "import logging, utils; log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
        f"log.warning({KERNELS_WARNING!r}); log.warning('another warning')"
    )
    done = subprocess.run([sys.executable, "-c", code], env=command_env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0 and done.stderr == "another warning\n"


def _train_and_sample(out, env, runs):
    """A smoke run that evaluates every 2 steps and merges, then sampling of its 4-bit base + adapter, in processes
    whose bitsandbytes takes the path ``env`` forces."""
    env = {**env, "MISTRAL_SFT_RUNS": str(runs)}
    argv = smoke_argv(out, "--eval_strategy", "steps", "--eval_steps", "2", "--merge", "true", steps=4, save=4)
    trained = subprocess.run(
        [sys.executable, "-m", "utils.sft", *argv], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    sampled = subprocess.run(
        [sys.executable, "-m", "utils.sampling", "--profile", "smoke", "--model", str(out / "adapter")]
        + ["--prompt", "What is an owl?", "--max_new_tokens", "12"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert sampled.returncode == 0, sampled.stdout[-2000:] + sampled.stderr[-2000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {
        "loss": [h["loss"] for h in history if "loss" in h],
        "eval_loss": [h["eval_loss"] for h in history if "eval_loss" in h],
        "answer": sampled.stdout.splitlines()[-1],
    }


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return {
        flag: _train_and_sample(
            tmp_path_factory.mktemp(f"avx512bf16-{flag}") / "run",
            cpu_path_env(env, flag),
            tmp_path_factory.mktemp(f"runs-{flag}"),
        )
        for flag in (True, False)
    }


def test_training_with_evaluation_runs_on_both_cpu_paths(both_paths):
    for result in both_paths.values():
        assert len(result["loss"]) == 4 and len(result["eval_loss"]) == 2


def test_both_cpu_paths_train_and_sample_the_same(both_paths):
    assert both_paths[True] == both_paths[False]

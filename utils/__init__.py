"""Shared helpers of the tutorial notebooks and their scripts, one module per stage (``data`` for notebook 01,
``recipe``, ``training`` and ``sft`` for 02 and 03, ``curves`` for 04, ``sampling`` for 05); ``tools/`` builds the
embedded default and runs the notebooks. Here: the shared paths, the error type and file helpers."""

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: nothing a learner can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
# On a CPU with AVX512-BF16, bitsandbytes 0.50 logs in every process that it could not fetch a Hub kernel with
# `kernels` (not installed: it would download code) and uses its own: that line made one-line errors two.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DATA_DIR = REPO_ROOT / "data"
SAMPLE_DIR = DATA_DIR / "sample"
# What the tools keep (prepared-data cache, executed notebooks, plots, logged answers, check records) and where they
# look for runs; MISTRAL_SFT_RUNS moves it (a bigger disk, /kaggle/working). A run itself goes to its --output_dir.
RUNS_DIR = Path(os.environ.get("MISTRAL_SFT_RUNS") or REPO_ROOT / "runs")


class ConfigError(ValueError):
    """Something the user can fix (a setting, a folder, a file, a model name), said in one line with a non-zero exit:
    the one error type of this collection (``RunError``, ``SourceError``, ... are kinds of it)."""


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (another user's counts): whether a lock or temporary folder it named is live."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return isinstance(exc, PermissionError)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_other_files(folder: Path) -> None:
    """Give each 0600 file under ``folder`` the mode the umask gives a new file: safetensors 0.8 writes every file
    0600, so a course's other users could not load an adapter, a checkpoint or a merged model."""
    mode = 0o666 & ~_umask()
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            file.chmod(mode)


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` for output renamed into place when whole, with the umask's permissions:
    ``tempfile.mkdtemp``'s 0700 would leave prepared data, merged models and assets unreadable to other users."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~_umask())
    return folder


def say(line: str) -> None:
    """One line in one write, so the lines of several processes sharing a terminal do not run into each other."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

"""Shared helpers of the mistral-7b-sft-beta tutorial notebooks and their scripts.

Each module is named for its stage: ``hardware`` (profiles), ``assets`` (tokenizer, chat template, tiny model),
``data`` and ``prepare_data`` (notebook 01), ``recipe``, ``training``, ``model`` and ``sft`` (notebooks 02 and 03),
``card_era`` (the card's token ids, packing and stop), ``tiny_world`` (the embedded default's world and checks),
``curves`` (notebook 04), ``sampling`` (notebook 05), ``exercises`` (the check cells under each Try this). What builds
the embedded default's model and data and runs the notebooks is in ``tools/``.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

# peft 0.21 reads the model's old `is_gradient_checkpointing` attribute, which transformers 5 marks deprecated: the
# warning is about peft's code, not ours, and says nothing a learner can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
# On a CPU with AVX512-BF16, importing bitsandbytes 0.50 tries to fetch a 4-bit kernel from the Hub with `kernels` (not
# installed: it would download code at import), logs that it could not in every process, and uses its own kernel (as
# utils.model.keep_standard_4bit_layout wants anyway): the line tells a learner nothing, and made one-line errors two.
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
    """Something the user can fix (a setting, a folder, a file, a model name), found before any heavy work: the one
    error type of this collection, said in one line with a non-zero exit. The others (``RunError``, ``SourceError``,
    ``OutputError``, ``SamplingError``, ``OptionError``) are kinds of it."""


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (another user's counts): whether a lock or temporary folder it named is live."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_other_files(folder: Path) -> None:
    """Give each file under ``folder`` that only its owner may read (mode 0600) the mode the umask gives a new file:
    safetensors 0.8 writes every file 0600 (through a private temporary file), so a course's other users could not
    load an adapter, a checkpoint or a merged model. Files of any other mode are left as they are."""
    mode = 0o666 & ~_umask()
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            file.chmod(mode)


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` (made if missing) for output that is renamed into place when whole, with the
    permissions the umask gives any folder: ``tempfile.mkdtemp`` makes it private (0700), which would leave prepared
    data, merged models and assets unreadable to a course's other users."""
    import tempfile

    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~_umask())
    return folder


def say(line: str) -> None:
    """One line in one write, so the lines of several processes sharing a terminal do not run into each other."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

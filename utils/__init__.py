"""Shared helpers of the mistral-7b-sft-beta tutorial notebooks and their scripts.

Each module is named for its stage: ``hardware`` (profiles), ``assets`` (tokenizer, chat template, tiny model),
``filters`` and ``prepare_data`` (notebook 01), ``notebook_runner`` (``make tutorial``).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
DATA_DIR = REPO_ROOT / "data"
SAMPLE_DIR = DATA_DIR / "sample"
RUNS_DIR = REPO_ROOT / "runs"

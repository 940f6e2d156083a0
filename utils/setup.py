"""The rest of every notebook's first cell (``tools/setup_cell.SETUP_CELL``), once it has found or cloned this."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def finish_setup(root: str | Path, install: bool) -> None:
    """Install the pinned packages into a fresh clone, work from its folder, put torchrun on the PATH, print the
    commit."""
    root = Path(root).absolute()
    if install:
        before = _numpy_and_pyarrow()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(root / "requirements.txt")], check=True)
        if _numpy_and_pyarrow() != before:  # Colab/Kaggle imported the old ones already
            raise SystemExit(
                "numpy or pyarrow changed: restart the runtime (Colab: Runtime > Restart session) and run again."
            )
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # torchrun in shell cells
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = done.stdout.strip() if done.returncode == 0 else ""  # a tag can move; the commit cannot
    print("collection at", root, f"(commit {commit})" if commit else "(not a git checkout)")


def _numpy_and_pyarrow() -> list[tuple[str, str]]:
    from importlib.metadata import distributions

    return sorted((d.name, d.version) for d in distributions() if d.name in ("numpy", "pyarrow"))
